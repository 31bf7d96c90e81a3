"""Bad input never gives a traceback: one `error:` line naming the field, file or service, a
non-zero exit, no MLflow run and no checkpoint directory, and no Ray resources used."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from methodlab.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LABELS = {"label_99": pa.array([0, 1, 2, 99, 4, 5], pa.int64()), "label_negative": pa.array([0, 1, -1, 3, 4, 5], pa.int64()),
          "label_null": pa.array([0, 1, None, 3, 4, 5], pa.int64()),
          "float_labels": pa.array(np.arange(6, dtype=np.float32))}


def _dataset(tmp_path, damage: str) -> str:
    from methodlab.data import write_dataset
    from methodlab.data.dataset import to_arrow

    x = np.zeros((6, 1, 8, 8), np.float32)
    y = np.arange(6, dtype=np.int64)
    root = tmp_path / "ds"
    write_dataset(str(root), "bad", {s: {"image": x, "label": y} for s in ("train", "val", "test")}, {"num_classes": 10})
    part = root / "train" / "part-00000.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:100])
    elif damage == "garbage":
        part.write_bytes(b"PAR1 this is not parquet")
    elif damage == "missing_column":
        pq.write_table(pa.table({"label": y}), part)
    elif damage == "dtype":
        pq.write_table(pa.table({"image": to_arrow(x.astype(np.float64)), "label": y}), part)
    elif damage == "float_files_uint8_manifest":
        # The manifest says uint8 images (as every image dataset now stores them), the files float32.
        m = json.loads((root / "dataset.json").read_text())
        m["columns"]["image"].update(dtype="uint8", scale=1 / 255)
        (root / "dataset.json").write_text(json.dumps(m))
    elif damage == "uint8_files_float_manifest":
        pq.write_table(pa.table({"image": to_arrow(x.astype(np.uint8)), "label": y}), part)
    elif damage == "shape":
        pq.write_table(pa.table({"image": to_arrow(np.zeros((6, 3, 8, 8), np.float32)), "label": y}), part)
    elif damage == "no_manifest":
        (root / "dataset.json").unlink()
    elif damage == "bad_manifest":
        (root / "dataset.json").write_text("{not json")
    elif damage == "manifest_field":
        m = json.loads((root / "dataset.json").read_text())
        del m["columns"]
        (root / "dataset.json").write_text(json.dumps(m))
    elif damage == "manifest_list":
        (root / "dataset.json").write_text(json.dumps([1, 2]))
    elif damage == "columns_list":
        m = json.loads((root / "dataset.json").read_text())
        m["columns"] = list(m["columns"])
        (root / "dataset.json").write_text(json.dumps(m))
    elif damage == "column_dtype":
        m = json.loads((root / "dataset.json").read_text())
        m["columns"]["image"]["dtype"] = "float99"
        (root / "dataset.json").write_text(json.dumps(m))
    elif damage in LABELS:
        pq.write_table(pa.table({"image": to_arrow(x), "label": LABELS[damage]}), part)
    elif damage in ("nan", "inf"):
        x[3, 0, 2, 2] = np.nan if damage == "nan" else np.inf
        pq.write_table(pa.table({"image": to_arrow(x), "label": y}), part)
    elif damage in ("no_num_classes", "string_num_classes"):
        m = json.loads((root / "dataset.json").read_text())
        m["meta"] = {} if damage == "no_num_classes" else {"num_classes": "10"}
        (root / "dataset.json").write_text(json.dumps(m))
    elif damage == "no_train_rows":
        pq.write_table(pq.read_table(part).slice(0, 0), part)
    elif damage == "no_val":
        m = json.loads((root / "dataset.json").read_text())
        m["splits"] = ["train", "test"]
        (root / "dataset.json").write_text(json.dumps(m))
    return str(root)


CASES = [
    # (id, argv after "train supervised", fragment of the one-line message)
    ("unknown key", ["train.lrr=0.1"], "unknown config key train.lrr"),
    ("resume, local storage", ["resume"], "is local, so every checkpoint is already there; submit without `resume`"),
    ("misspelled section", ["scailng.num_workers=2"], "did you mean scaling?"),
    ("wrong type int", ["train.epochs=many"], "train.epochs: Input should be a valid integer"),
    ("wrong type bool", ["scaling.use_gpu=maybe"], "scaling.use_gpu: Input should be a valid boolean"),
    ("negative lr", ["train.lr=-0.1"], "train.lr: Input should be greater than 0"),
    ("zero epochs", ["train.epochs=0"], "train.epochs: Input should be greater than 0"),
    ("zero batch size", ["train.batch_size=0"], "train.batch_size: Input should be greater than 0"),
    ("negative workers", ["scaling.num_workers=-1"], "scaling.num_workers: Input should be greater than 0"),
    ("zero cpus", ["scaling.cpus_per_worker=0"], "scaling.cpus_per_worker: Input should be greater than 0"),
    ("bad choice", ["train.optimizer=lion"], "train.optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
    ("bad precision", ["train.precision=fp8"], "train.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ("bad run name", ["train.run_name=../escape"], "train.run_name: use letters, digits"),
    ("method field range", ["method.label_smoothing=1.5"], "method.label_smoothing: Input should be less than 1"),
    ("zero limit rows", ["data.limit_rows=0"], "data.limit_rows: Input should be greater than 0"),
    ("not key=value", ["lr0.1"], "override 'lr0.1' is not key=value"),
    ("value under a value", ["train.lr.x=1"], "train.lr"),
    ("missing dataset", ["data.dataset=/no/such/data"], "dataset /no/such/data does not exist"),
    ("memory over budget", ["data.loader=memory", "data.memory_budget_mb=0.01"],
     "over the 10.2 KB budget (data.memory_budget_mb=0.01 per node); set data.loader=stream"),
    ("unsupported tracking uri", ["tracking.uri=ftp://host/x"], "tracking.uri 'ftp://host/x' is not a supported MLflow URI"),
    ("tracking uri with a password", ["tracking.uri=postgresql://user:hunter2@db/mlflow"],
     "tracking.uri 'postgresql://user:***@db/mlflow' is not a supported MLflow URI"),
    ("sqlite store under a file", ["tracking.uri=sqlite:///{tmp}/a-file/db/mlflow.db"],
     "tracking.uri sqlite:///{tmp}/a-file/db/mlflow.db: cannot create {tmp}/a-file/db (Not a directory); "
     "point tracking.uri at a writable place"),
    ("dataset is a file", ["data.dataset={tmp}/a-file"],
     "dataset {tmp}/a-file is a file, not a dataset directory; point data.dataset at the directory"),
    # Locations: a local path or a lowercase s3://bucket/prefix, nothing else (issue 21, item 6).
    ("empty s3 uri", ["data.dataset=s3://"], "data.dataset: use a local path or s3://bucket/prefix"),
    ("s3 uri without bucket", ["storage.path=s3:///runs"], "storage.path: use a local path or s3://bucket/prefix"),
    ("s3 uri with one slash", ["storage.path=s3:/bucket/x"], "storage.path: use a local path or s3://bucket/prefix"),
    ("uppercase s3 uri", ["storage.path=S3://Bad_Bucket/runs"], "storage.path: use a local path or s3://bucket/prefix"),
    ("bucket with underscore", ["storage.path=s3://bad_bucket/runs"], "storage.path: use a local path"),
    ("other scheme", ["data.root=gs://bucket/data"], "data.root: use a local path or s3://bucket/prefix"),
    ("s3 uri with credentials", ["storage.path=s3://AKIAX:hunter2@bucket/runs"],
     "storage.path: an S3 URI carries no credentials; put them in AWS_ACCESS_KEY_ID"),
    # YAML in an override: no aliases (an alias bomb), and a mapping where a value goes is the
    # override's fault, not the defaults' it replaces.
    ("alias in an override", ["method.arch_kwargs={a: &x [1, 2], b: *x}"],
     "override 'method.arch_kwargs={a: &x [1, 2], b: *x}': anchors and aliases (&name, *name) are not supported"),
    ("model name with a slash", ["tracking.registered_model=bad/name"],
     "tracking.registered_model: MLflow model names cannot contain '/' or ':'"),
    ("seed too large for torch", ["train.seed=99999999999999999999"],
     "train.seed: Input should be less than or equal to 9223372036854775807"),
    ("mapping for a value", ["train.epochs={a: 1}"],
     "train.epochs: Input should be a valid integer (set by override 'train.epochs={a: 1}')"),
]
DATA_CASES = [
    ("truncated", "train/part-00000.parquet is not a readable Parquet file"),
    ("garbage", "train/part-00000.parquet is not a readable Parquet file"),
    ("missing_column", "missing column 'image'"),
    ("dtype", "column 'image' has dtype float64, expected float32"),
    ("float_files_uint8_manifest",
     "column 'image' has dtype float32, expected uint8 (dataset.json and the file disagree); re-create the dataset"),
    ("uint8_files_float_manifest", "column 'image' has dtype uint8, expected float32"),
    ("shape", "column 'image' has shape [3, 8, 8], expected [1, 8, 8]"),
    ("no_manifest", "has no dataset.json"),
    ("bad_manifest", "dataset.json is not valid JSON"),
    ("manifest_field", "dataset.json lacks field 'columns'"),
    ("manifest_list", "dataset.json: the manifest must be a JSON object, not list; re-create the dataset"),
    ("columns_list", "dataset.json: 'columns' must be a JSON object, not list; re-create the dataset"),
    ("column_dtype", "dataset.json: 'columns'['image'] is not {dtype, shape}"),
    ("no_val", "has no 'val' split"),
    # What the data holds (issue 22, item 6), from the Parquet footers before Ray starts.
    ("label_99", "split 'train': labels span 0..99 but meta.num_classes is 10 (labels 0..9)"),
    ("label_negative", "split 'train': labels span -1..5 but meta.num_classes is 10"),
    ("label_null", "split 'train': 1 label(s) are missing (null); every row needs a label"),
    ("float_labels", "column 'label' has dtype float32, expected int64"),
    ("nan", "split 'train': column 'image' holds NaN or inf"),
    ("inf", "split 'train': column 'image' holds NaN or inf"),
    ("no_num_classes", "dataset.json: meta.num_classes must be a positive integer (got None)"),
    ("string_num_classes", "dataset.json: meta.num_classes must be a positive integer (got '10')"),
    ("no_train_rows", "the train split has no rows"),
    ("none", "the train split has 6 row(s), fewer than one global batch of 128 (train.batch_size=64 x "
             "scaling.num_workers=2); lower the batch size, use more data, or set data.allow_tiny=true"),
]


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch, request):
    """Preflight must refuse before Ray is touched: reaching for the cluster fails the test."""
    if "ray_cluster" in request.fixturenames:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was used for an input that preflight can refuse")

    from methodlab.train import launch
    monkeypatch.setattr(launch, "ensure_ray", refuse)


def _run(capsys, argv) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


SECRET = "hunter2"    # the password the cases write into URIs: never shown


def _assert_refused(code, err, fragment, home):
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0], err[0]
    assert SECRET not in err[0]
    assert not (home / "runs").exists()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config(case, home, tmp_path, capsys):
    _, argv, fragment = case
    (tmp_path / "a-file").write_text("not a directory")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    _assert_refused(*_run(capsys, ["train", "supervised", *map(fill, argv)]), fill(fragment), home)


@pytest.mark.parametrize("damage,fragment", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_dataset(damage, fragment, home, tmp_path, capsys):
    root = _dataset(tmp_path, damage)
    _assert_refused(*_run(capsys, ["train", "supervised", f"data.dataset={root}"]), fragment, home)


# A "billion laughs" bomb under method.arch_kwargs: 9 ** 7 (4.8 million) strings from 350 bytes.
ALIAS_BOMB = "method:\n  arch_kwargs:\n    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg"))
CONFIG_FILES = [
    # (file name, contents, overrides, fragment of the one-line message)
    ("bad.yaml", "train: {lr: [\n", [], "bad.yaml is not valid YAML"),
    ("list.yaml", "- a\n", [], "must be a mapping of sections"),
    ("binary.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", [], "binary.yaml is binary, not YAML text"),
    ("nul.yaml", "train:\n  lr: 0.1\x00\n", [], "nul.yaml is binary, not YAML text"),
    ("dup.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n", [], "dup.yaml is not valid YAML at line 3: duplicate key 'lr'"),
    ("dup-section.yaml", "train: {lr: 0.1}\ntrain: {epochs: 2}\n", [], "duplicate key 'train'"),
    ("bomb.yaml", ALIAS_BOMB, [], "bomb.yaml is not valid YAML at line 3: anchors and aliases"),
    ("merge.yaml", "base: &b {lr: 0.1}\ntrain:\n  <<: *b\n", [], "anchors and aliases"),
    # An override of a section the YAML sets to a value would silently drop the YAML's value.
    ("five.yaml", "train: 5\n", ["train.epochs=3"],
     "override 'train.epochs=3': train is a value (5) in {path}, not a section; write train as a mapping there"),
    ("kwargs.yaml", "method:\n  arch_kwargs: 3\n", ["method.arch_kwargs.depth=2"],
     "method.arch_kwargs is a value (3) in {path}, not a section"),
]


def test_a_single_class_train_split_is_warned_about_in_one_line(home, tmp_path, capsys):
    from methodlab.config import load_config
    from methodlab.data.dataset import to_arrow
    from methodlab.train.launch import preflight

    root = _dataset(tmp_path, "none")
    pq.write_table(pa.table({"image": to_arrow(np.zeros((6, 1, 8, 8), np.float32)), "label": np.zeros(6, np.int64)}),
                   f"{root}/train/part-00000.parquet")
    preflight(load_config("supervised", None, [f"data.dataset={root}", "data.allow_tiny=true"]))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"[methodlab] warning: dataset {root}, split 'train' has a single class (0); "
                   "the model cannot learn to tell classes apart"]


def test_config_file_problems(home, tmp_path, capsys):
    _assert_refused(*_run(capsys, ["train", "supervised", "-c", str(tmp_path / "nope.yaml")]),
                    "nope.yaml does not exist", home)
    for name, text, overrides, fragment in CONFIG_FILES:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        started = time.monotonic()
        _assert_refused(*_run(capsys, ["train", "supervised", "-c", str(path), *overrides]),
                        fragment.format(path=path), home)
        assert time.monotonic() - started < 5, f"{name} took {time.monotonic() - started:.0f}s to refuse"


def test_yaml_values_under_a_section_override_are_kept(tmp_path):
    """A `train.*` override merges into the YAML's `train:` section; it never replaces it."""
    from methodlab.config import load_config

    (tmp_path / "c.yaml").write_text("train: {lr: 0.25, epochs: 7}\n")
    cfg = load_config("supervised", str(tmp_path / "c.yaml"), ["train.epochs=3", "train={batch_size: 8}"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.25, 3, 8)


COMMANDS = [
    # (id, argv with {tmp} for the test's folder, fragment); the folder has imgs/a/ (a class
    # folder), x/res101.mat and x/att_splits.mat (not MATLAB files), a corrupt spool line.
    ("import size 0", ["data", "import", "{tmp}/imgs", "--out", "{tmp}/out", "--size", "0"],
     "--size 0: must be at least 1 (e.g. --size 32)"),
    ("import workers 0", ["data", "import", "{tmp}/imgs", "--out", "{tmp}/out", "--workers", "0"],
     "--workers 0: must be at least 1"),
    ("import out s3://", ["data", "import", "{tmp}/imgs", "--out", "s3://"],
     "--out s3://: use a local path or s3://bucket/prefix"),
    ("import out with credentials", ["data", "import", "{tmp}/imgs", "--out", "s3://AK:hunter2@bucket/x"],
     "--out s3://AK:***@bucket/x: an S3 URI carries no credentials"),
    ("format import out s3:/", ["data", "import-cifar10", "{tmp}/imgs", "--out", "s3:/bucket"],
     "--out s3:/bucket: use a local path or s3://bucket/prefix"),
    ("xlsa17 not MATLAB", ["data", "import-xlsa17", "{tmp}/x", "--out", "{tmp}/out"],
     "x/res101.mat is not a readable MATLAB file"),
    ("sync corrupt spool line", ["sync", "--spool", "{tmp}/spool"],
     "metric spool {tmp}/spool/r1.jsonl line 2 is not a spooled metrics line; move the file aside"),
]


@pytest.mark.parametrize("case", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_bad_commands(case, home, tmp_path, capsys):
    _, argv, fragment = case
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "res101.mat").write_bytes(b"hello")
    (tmp_path / "x" / "att_splits.mat").write_bytes(bytes(range(50)))
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "r1.jsonl").write_text(
        json.dumps({"uri": "sqlite:///x.db", "run_id": "r1", "step": 0, "metrics": {}}) + "\n{\"uri\": \"sqli\n")
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    _assert_refused(*_run(capsys, [fill(a) for a in argv]), fill(fragment), home)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, field, made_by", [
    ("toast", "backbone", "methodlab train supervised data.dataset=digits_source method.arch=vit"),
    ("canonicalization", "predictor", "methodlab train supervised`"),
])
def test_a_fresh_store_names_the_command_that_creates_a_missing_default_model(method, field, made_by, home, capsys):
    """TOAST's and canonicalization's default backbone/predictor exist only once the run that
    registers it has run (make demo runs it first): refused before Ray, naming that run, and
    asking does not create the store."""
    code, err = _run(capsys, ["train", method])
    _assert_refused(code, err, f"method.{field} models:/", home)
    assert "does not exist" in err[0] and f"create it with `{made_by}" in err[0] and f"or set method.{field}" in err[0]
    assert not (home / "mlflow.db").exists()


@pytest.mark.parametrize("uri, why", [("{tmp}/nope.pt", "no such file or directory"),
                                      ("models:/never-registered@candidate", "")])
def test_a_missing_pretrained_model_is_one_line(uri, why, home, tmp_path, capsys):
    from methodlab.config import default_tracking_uri
    from methodlab.tracking import Tracker

    Tracker(default_tracking_uri(), "methodlab")          # an existing store, without the model
    uri = uri.replace("{tmp}", str(tmp_path))
    code, err = _run(capsys, ["train", "toast", f"method.backbone={uri}"])
    _assert_refused(code, err, f"method.backbone {uri} does not exist", home)
    assert why in err[0] and "set method.backbone to a model that exists" in err[0]


CNN = {"arch": "cnn", "kwargs": {"width": 4, "embed_dim": 8, "in_channels": 1, "num_classes": 10}}
VIT = {"arch": "vit", "kwargs": {"img_size": 8, "patch_size": 4, "in_channels": 1, "num_classes": 10, "embed_dim": 16,
                                 "depth": 1, "num_heads": 2}}


def _with(spec: dict, **kwargs) -> dict:
    return {"arch": spec["arch"], "kwargs": {**spec["kwargs"], **kwargs}}


MISFITS = [
    # (id, method, field, extra overrides, the model's spec (None: no model in the file), fragment)
    ("predictor of other classes", "canonicalization", "predictor", [], _with(CNN, num_classes=5),
     "predicts 5 classes but dataset bad has 10 (meta.num_classes)"),
    ("init for RGB images", "supervised", "init", [], _with(CNN, in_channels=3),
     "does not take this dataset's 1x8x8 images"),
    ("init ViT of another size", "supervised", "init", [], _with(VIT, img_size=16),
     "does not take this dataset's 1x8x8 images"),
    ("backbone not a ViT", "toast", "backbone", ["method.pretune_epochs=0"], CNN, "is a 'cnn' model; TOAST needs a ViT"),
    ("backbone of another size", "toast", "backbone", ["method.pretune_epochs=0"], _with(VIT, img_size=16),
     "takes 1x16 images but dataset bad has 1x8x8"),
    ("extractor for RGB images", "bad_batches", "extractor_uri", ["method.extractor=frozen"],
     _with(CNN, in_channels=3), "does not take this dataset's 1x8x8 images"),
    ("no model in the file", "canonicalization", "predictor", [], None, "holds no methodlab model"),
]


@pytest.mark.parametrize("case", MISFITS, ids=[c[0] for c in MISFITS])
def test_a_pretrained_model_that_does_not_fit_the_run_is_one_line(case, home, tmp_path, capsys):
    """A model that exists but that the method cannot use on this dataset (another class count,
    channel count or image size, not a ViT for TOAST, no model at all) is refused before Ray,
    naming the field, instead of failing inside the workers."""
    import torch

    from methodlab.models import build_model
    from methodlab.models.hub import save_pretrained

    _, method, field, extra, spec, fragment = case
    data = _dataset(tmp_path, "none")
    path = str(tmp_path / "model.pt")
    if spec is None:
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        save_pretrained(build_model(spec), spec, path)
    code, err = _run(capsys, ["train", method, f"data.dataset={data}", "data.allow_tiny=true", *extra,
                              f"method.{field}={path}"])
    _assert_refused(code, err, f"method.{field}", home)
    assert fragment in err[0], err[0]


def test_a_registered_model_is_resolved_and_checked_before_ray(home, tmp_path, capsys):
    """models:/ as the predictor: a registered model of the wrong class count is refused in one
    line; one that fits passes preflight (the check is no blanket refusal)."""
    import numpy as np
    import torch

    from methodlab.config import default_tracking_uri, load_config
    from methodlab.models import build_model
    from methodlab.tracking import Tracker
    from methodlab.train.launch import preflight

    tracker = Tracker(default_tracking_uri(), "methodlab")
    example = np.zeros((2, 1, 8, 8), np.float32)
    for name, classes in (("five", 5), ("ten", 10)):
        spec = _with(CNN, num_classes=classes)
        source = {"from": "test", "license": "MIT", "sha256": "0" * 64}
        tracker.register_import(name, build_model(spec), {**spec, "source": source}, example)
    data = _dataset(tmp_path, "none")
    capsys.readouterr()                                   # (MLflow's lines about registering)
    argv = ["train", "canonicalization", f"data.dataset={data}", "data.allow_tiny=true"]
    code, err = _run(capsys, [*argv, "method.predictor=models:/five@candidate"])
    _assert_refused(code, err, "method.predictor models:/five@candidate predicts 5 classes but dataset bad has 10", home)
    preflight(load_config("canonicalization", None, [*argv[2:], "method.predictor=models:/ten@candidate"]))


def test_unknown_method(home, capsys):
    _assert_refused(*_run(capsys, ["train", "supervize"]), "unknown method 'supervize'; did you mean 'supervised'?", home)


def test_unreachable_services(home, capsys, bucket):
    endpoint, name = bucket
    port = _closed_port()
    for argv, fragment in [
        ([f"tracking.uri=http://127.0.0.1:{port}"], f"MLflow tracking server http://127.0.0.1:{port} is unreachable"),
        (["storage.path=s3://bkt/runs", f"storage.endpoint_url=http://127.0.0.1:{port}"],
         f"S3 endpoint http://127.0.0.1:{port} is unreachable"),
        (["storage.path=s3://missing-bucket/runs", f"storage.endpoint_url={endpoint}"],
         "S3 bucket 'missing-bucket' does not exist"),
        (["storage.path=s3://bkt/runs", f"storage.endpoint_url=http://AK:{SECRET}@127.0.0.1:{port}"],
         f"S3 endpoint http://AK:***@127.0.0.1:{port} is unreachable"),
        ([f"data.dataset=s3://{name}/no-dataset", f"storage.endpoint_url={endpoint}"],
         f"dataset s3://{name}/no-dataset does not exist"),
        ([f"tracking.uri=http://user:{SECRET}@127.0.0.1:{port}"],
         f"MLflow tracking server http://user:***@127.0.0.1:{port} is unreachable"),
    ]:
        _assert_refused(*_run(capsys, ["train", "supervised", *argv]), fragment, home)


def test_model_uri_that_does_not_exist(home):
    from methodlab.errors import ConfigError
    from methodlab.models.hub import load_pretrained

    with pytest.raises(ConfigError, match="model models:/nope@champion not found"):
        load_pretrained("models:/nope@champion", f"sqlite:///{home}/mlflow.db")
    with pytest.raises(ConfigError, match="model file /no/file.pt does not exist"):
        load_pretrained("/no/file.pt")


@pytest.mark.slow
def test_more_workers_than_the_cluster_has(ray_cluster, home, capsys):
    code, err = _run(capsys, ["train", "supervised", "scaling.num_workers=8"])
    assert code != 0 and len(err) == 1
    assert "scaling.num_workers=8 x scaling.cpus_per_worker=0.5" in err[0] and "the cluster has 2" in err[0]
    assert not (home / "runs").exists()


KEYS = ["train.epochs", "train.lr", "train.batch_size", "train.optimizer", "scaling.num_workers",
        "scaling.use_gpu", "data.limit_rows", "method.arch", "method.label_smoothing", "nonsense.key", "train"]
VALUES = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text("abcxyz/:{}[]", max_size=6), st.none())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_random_configs_give_validation_errors_never_tracebacks(pairs, home, capsys):
    """Any config either validates or is refused with one `error:` line (checked up to preflight)."""
    from methodlab.config import load_config
    from methodlab.errors import MethodlabError

    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config("supervised", None, overrides)
    except MethodlabError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert cfg.train.epochs > 0 and 0 < cfg.train.lr < float("inf")


def test_overrides_after_the_config_file_are_overrides(capsys):
    """`train supervised -c file.yaml key=value`, as the README and job docstrings write it: the
    overrides after -c are read as overrides (argparse alone would call them unrecognized)."""
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    code, err = _run(capsys, ["train", "supervised", "-c", str(jobs / "configs" / "supervised.yaml"), "train.lr=abc"])
    assert code == 2 and len(err) == 1 and "(set by override 'train.lr=abc')" in err[0]
    code, err = _run(capsys, ["sweep", "supervised", "-c", str(jobs / "sweeps" / "supervised.yaml"),
                              "search.num_samples=abc"])
    assert code == 2 and len(err) == 1 and "(got 'abc', set by override 'search.num_samples=abc')" in err[0]
    with pytest.raises(SystemExit) as refused:       # an unknown option is still argparse's error
        main(["train", "supervised", "-c", str(jobs / "configs" / "supervised.yaml"), "--bogus"])
    assert refused.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# The front door fuzzed: a YAML file, overrides and a dataset manifest, each mutated.
YAML_SECTIONS = st.dictionaries(
    st.sampled_from(["train", "data", "scaling", "method", "tracking", "storage", "nonsense"]),
    st.one_of(VALUES, st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "seed", "path", "dataset",
                                                       "arch_kwargs", "num_workers", "registered_model"]),
                                      VALUES, max_size=3)), max_size=3)
YAML_MUTATIONS = st.lists(st.tuples(st.integers(0, 200), st.sampled_from(
    ["&a ", "*a", ": ", "\n", "\x00", "- ", "{", "<<: *a\n", "\ntrain: 1\n", "\ntrain:\n  lr: 2\n"])), max_size=3)
LOCATIONS = st.sampled_from(["s3://", "s3:///runs", "s3:/x", "S3://Bad_Bucket/x", "gs://b/x",
                             "s3://K:hunter2@bucket/x", "rel/dir", "{tmp}/a-file", ""])
LOCATION_KEYS = st.sampled_from(["storage.path", "data.root", "tracking.uri"])
MANIFEST_MUTATIONS = st.sampled_from([None, ("columns", []), ("columns", {"image": "x"}), ("meta", {}),
                                      ("meta", {"num_classes": "10"}), ("meta", {"num_classes": 2}),
                                      ("splits", "train"), ("name", None), ("whole", [1])])


def _maybe(strategy):
    """Half the time nothing, so that enough examples get past the config to preflight."""
    return st.one_of(st.just([]), strategy)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sections=st.one_of(st.just({}), YAML_SECTIONS), mutations=_maybe(YAML_MUTATIONS),
       pairs=_maybe(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3)),
       locations=_maybe(st.lists(st.tuples(LOCATION_KEYS, LOCATIONS), max_size=2)), manifest=MANIFEST_MUTATIONS)
def test_front_door_fuzz(sections, mutations, pairs, locations, manifest, home, tmp_path_factory, capsys):
    """Either the config is valid (and preflight passes or refuses in one line), or the command
    exits non-zero with exactly one `error:` line; never a traceback, never Ray, nothing written
    under the MLflow store or the storage path."""
    import ray
    import yaml

    from methodlab.config import load_config
    from methodlab.errors import MethodlabError
    from methodlab.train.launch import preflight

    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "a-file").write_text("x")
    text = yaml.safe_dump(sections)
    for at, piece in mutations:
        text = text[:at] + piece + text[at:]
    (tmp / "c.yaml").write_text(text)
    root = _dataset(tmp, "none")
    if manifest:
        m = json.loads(Path(root, "dataset.json").read_text())
        field, value = manifest
        m = value if field == "whole" else {**m, field: value}
        Path(root, "dataset.json").write_text(json.dumps(m))
    overrides = [f"{k}={v}" for k, v in pairs] + [f"{k}={v}".replace("{tmp}", str(tmp)) for k, v in locations]
    overrides += [f"data.dataset={root}", "data.allow_tiny=true", f"storage.local_fallback={tmp}/fallback"]
    argv = ["train", "supervised", "-c", str(tmp / "c.yaml"), *overrides]
    # Nothing here may start Ray: a call to ray.init fails the example (the session's own Ray
    # may already be up from earlier tests, so is_initialized() alone cannot tell).
    with mock.patch.object(ray, "init", side_effect=AssertionError("the front door started Ray")):
        code, err = _run(capsys, [*argv, "--print-config"])
        event("config valid" if code == 0 else "refused by the config")
        if code == 0:
            try:
                preflight(load_config("supervised", str(tmp / "c.yaml"), overrides))
            except MethodlabError as e:
                err = [f"error: {e}"]
            event("refused by preflight" if err else "passed preflight")
            capsys.readouterr()
    if err:
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        assert "hunter2" not in err[0]
    written = [p for p in (home / "mlflow.db", home / "runs", tmp / "rel", Path("rel"), tmp / "fallback") if p.exists()]
    assert not written, written
