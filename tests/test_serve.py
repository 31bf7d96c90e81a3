"""Registered models as MLflow users load and serve them: the pyfunc takes the raw input the
dataset stores (digits: uint8 counts 0..16), decodes it itself and returns labels and class
probabilities; its signature and metadata document that input; `methodlab serve` answers HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from methodlab.config import load_config
from methodlab.data import read_split, resolve_dataset
from methodlab.data.decode import decode_arrays
from methodlab.models import build_model
from methodlab.models.serving import BY_PYFUNC, Predictor, input_doc
from methodlab.registry import get_method, method_names
from tests.conftest import ROOT, tiny

SPEC = {"arch": "cnn", "kwargs": {"width": 4, "embed_dim": 8, "num_classes": 10}}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return resolve_dataset("digits", str(tmp_path_factory.mktemp("data")))


def _reference(model, raw: np.ndarray, mean=None, std=None) -> np.ndarray:
    """Softmax of the platform's model on the input decoded by hand (counts / 16, standardized)."""
    x = raw.astype(np.float64) / 16
    if mean is not None:
        x = (x - np.asarray(mean)[None, :, None, None]) / np.asarray(std)[None, :, None, None]
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x.astype(np.float32))), -1).numpy()


# ----------------------------------------------------------------------------------------------
# The raw input, documented from the dataset


def test_digits_input_is_documented_as_stored(digits):
    assert input_doc(digits, "image", False) == {"dtype": "uint8", "shape": [-1, 1, 8, 8], "range": [0, 16],
                                                  "scale": 1 / 16}
    doc = input_doc(digits, "image", True)
    assert doc["normalized_by"] == BY_PYFUNC and doc["mean"] == digits.columns["image"].mean
    stored = read_split(digits, "train")["image"]
    assert stored.dtype == np.uint8 and stored.min() == 0 and stored.max() == 16     # the range is the data's


@pytest.mark.parametrize("name", method_names())
def test_every_methods_exported_model_has_a_documented_raw_input(name, tmp_path_factory):
    """Registry-driven, without training: the column each method exports is in its default
    dataset, documented with its stored dtype and per-row shape, and every stored row lies in the
    documented range (a scaled column's scale and range known); a packed column's layout adds
    up to its width."""
    method = get_method(name)
    cfg = load_config(name, None, tiny(name))
    info = resolve_dataset(cfg.data.dataset or method.default_dataset, str(tmp_path_factory.mktemp("data")))
    assert method.export_input in info.columns, f"{name} exports {method.export_input!r}, not a column of {info.name}"
    doc = input_doc(info, method.export_input, cfg.data.normalize)
    col = info.columns[method.export_input]
    assert doc["dtype"] == col.dtype and doc["shape"] == [-1, *col.shape]
    stored = read_split(info, "val")[method.export_input]
    assert stored.dtype == np.dtype(doc["dtype"]) and list(stored.shape[1:]) == doc["shape"][1:]
    if np.dtype(col.dtype).kind in "ui":
        lo, hi = doc["range"]
        assert doc["scale"] > 0 and lo <= stored.min() and stored.max() <= hi
    if "layout" in doc:
        assert sum(int(np.prod(m["shape"])) for m in doc["layout"]) == col.shape[0]


@pytest.mark.parametrize("name", method_names())
def test_every_methods_exported_model_serves_its_raw_example(name, home):
    """Registry-driven, untrained (seeded) final-stage models: the served predictor on the raw
    example rows gives what the exported network gives on those rows decoded by the data layer
    (`decode_arrays`, with the run's data.normalize), and the example is the stored rows."""
    from tests.test_core import _final_stage_models, _method

    method = _method(name)
    model, spec = method.export(_final_stage_models(method))
    raw, doc = method.example_input(), method.export_input_doc()
    stored = read_split(method.data.info, "val", limit_rows=len(raw))
    np.testing.assert_array_equal(raw, stored[method.export_input])
    decoded = decode_arrays(stored, method.data.info.columns, method.cfg.data.normalize)[method.export_input]
    with torch.no_grad():
        ref = torch.softmax(model.eval()(torch.from_numpy(decoded)).float(), -1).numpy()
    out = Predictor(spec, model.state_dict(), doc).predict(raw)
    np.testing.assert_allclose(out["probabilities"], ref, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The predictor: raw in, the platform's model's answer out


@settings(max_examples=20, deadline=None)
@given(raw=arrays(np.uint8, st.tuples(st.integers(1, 6), st.just(1), st.just(8), st.just(8)),
                  elements=st.integers(0, 16)),
       normalize=st.booleans(), seed=st.integers(0, 3))
def test_predictor_on_raw_counts_is_the_model_on_decoded_input(digits, raw, normalize, seed):
    torch.manual_seed(seed)
    model = build_model(SPEC).eval()
    doc = input_doc(digits, "image", normalize)
    out = Predictor(SPEC, model.state_dict(), doc).predict(raw)
    col = digits.columns["image"]
    ref = _reference(model, raw, *((col.mean, col.std) if normalize else ()))
    np.testing.assert_allclose(out["probabilities"], ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, rtol=1e-5)
    assert out["label"].dtype == np.int64
    # (ties aside, which float noise may break either way)
    clear = np.sort(ref, -1)[:, -1] - np.sort(ref, -1)[:, -2] > 1e-5
    assert (out["label"][clear] == ref.argmax(-1)[clear]).all()


def test_predictor_refuses_what_the_dataset_never_stores(digits):
    predictor = Predictor(SPEC, build_model(SPEC).state_dict(), input_doc(digits, "image", False))
    with pytest.raises(ValueError, match=r"expected raw values in \[0, 16\]"):
        predictor.predict(np.full((1, 1, 8, 8), 255, np.uint8))     # pixels as 0..255, not counts
    with pytest.raises(ValueError, match=r"expected \[-1, 1, 8, 8\]"):
        predictor.predict(np.zeros((1, 64), np.uint8))


# ----------------------------------------------------------------------------------------------
# Logged to MLflow: the signature, the metadata, pyfunc's predict


def test_the_logged_model_documents_and_takes_raw_input(digits, tmp_path):
    import mlflow

    from methodlab.models.hub import load_pretrained
    from methodlab.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "serve-test")
    torch.manual_seed(0)
    model = build_model(SPEC)
    raw = read_split(digits, "val", limit_rows=20)["image"]
    run_id = tracker.start_run("r", {}, {}, "x: 1\n")
    doc = input_doc(digits, "image", False)
    assert tracker.register(run_id, model, SPEC, raw[:2], "digits-cnn", {}, doc) == "1"
    tracker.end_run(run_id, "FINISHED")

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/digits-cnn@candidate")
    assert info.metadata["input"] == doc
    assert set(info.flavors) == {"python_function"}          # no pickled torch module, no pt2 graph
    (spec,) = info.signature.inputs.inputs
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 1, 8, 8)
    assert [c.name for c in info.signature.outputs.inputs] == ["label", "probabilities"]
    local = mlflow.artifacts.download_artifacts("models:/digits-cnn@candidate", dst_path=str(tmp_path / "ex"))
    example = json.loads(open(os.path.join(local, "serving_input_example.json")).read())
    assert np.array(example["inputs"]).max() > 1       # the example is raw counts, not decoded floats

    pyfunc = mlflow.pyfunc.load_model("models:/digits-cnn@candidate")
    out = pyfunc.predict(raw)
    ref = _reference(load_pretrained("models:/digits-cnn@candidate", uri)[0].eval(), raw)
    np.testing.assert_allclose(np.stack(out["probabilities"]), ref, rtol=1e-4, atol=1e-6)
    assert (out["label"].to_numpy() == ref.argmax(-1)).all()


def test_an_imported_model_is_served_on_its_documented_floats_normalized_once(tmp_path):
    """`methodlab models import`'s registration: the input is [0, 1] floats that the network
    standardizes itself (its kwargs), so the pyfunc must not standardize them again."""
    import mlflow

    from methodlab.tracking import Tracker

    norm = {"input_mean": [0.4, 0.5, 0.6], "input_std": [0.2, 0.25, 0.3]}
    spec = {"arch": "vit", "kwargs": {"img_size": 8, "patch_size": 4, "in_channels": 3, "num_classes": 3,
                                      "embed_dim": 8, "depth": 1, "num_heads": 2, **norm},
            "input": {"dtype": "float32", "shape": [3, 8, 8], "range": [0.0, 1.0], "mean": norm["input_mean"],
                      "std": norm["input_std"], "normalized_by": "the model"},
            "source": {"from": "test", "file": "w.pt", "sha256": "0", "license": "test"}}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.rand(4, 3, 8, 8)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert Tracker(uri, "serve-test").register_import("tiny-vit", model, spec, x[:1].numpy()) == "1"
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/tiny-vit@candidate")
    assert info.metadata["input"] == {**spec["input"], "shape": [-1, 3, 8, 8]}
    out = mlflow.pyfunc.load_model("models:/tiny-vit@candidate").predict(x.numpy())
    with torch.no_grad():
        ref = torch.softmax(model(x), -1).numpy()
    np.testing.assert_allclose(np.stack(out["probabilities"]), ref, rtol=1e-4, atol=1e-6)


def test_the_server_finds_uvicorn_whatever_the_callers_path(monkeypatch):
    import shutil

    from methodlab.tracking import serve_command

    monkeypatch.setenv("PATH", "/usr/bin:/bin")          # a shell without the venv activated
    argv, env = serve_command("models:/m@candidate", "sqlite:///x.db", "127.0.0.1", 5001)
    assert shutil.which("uvicorn", path=env["PATH"]) and os.access(argv[0], os.X_OK)
    assert argv[1:5] == ["models", "serve", "-m", "models:/m@candidate"]
    assert argv[argv.index("--env-manager") + 1] == "local" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"


def test_serve_refuses_a_model_that_is_not_registered(tmp_path, capsys):
    from methodlab.cli import main

    assert main(["serve", "models:/nothing@candidate", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model models:/nothing@candidate is not in")
    assert main(["serve", "nothing.pt"]) != 0
    assert "models:/NAME@ALIAS" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A real run, loaded and served


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, server: subprocess.Popen, deadline: float) -> dict:
    """POST `payload` once the server answers; a server that exited fails with its output."""
    body = json.dumps(payload).encode()
    while True:
        if server.poll() is not None:
            raise AssertionError(f"methodlab serve exited {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(1)


@pytest.mark.slow
def test_a_trained_model_predicts_raw_digits_in_python_and_over_http(ray_cluster, home):
    import mlflow

    from methodlab.models.hub import load_pretrained
    from methodlab.train.launch import train

    cfg = load_config("supervised", None, tiny("supervised", "train.epochs=2"))
    summary = train(cfg)
    assert summary.status == "FINISHED" and summary.version == "1"
    model_uri = f"models:/{cfg.tracking.registered_model}@candidate"
    info = resolve_dataset(cfg.data.dataset or "digits", cfg.data.root)
    raw = read_split(info, "test", limit_rows=40)["image"]              # uint8 counts 0..16

    mlflow.set_tracking_uri(cfg.tracking.uri)
    out = mlflow.pyfunc.load_model(model_uri).predict(raw)
    model, _ = load_pretrained(model_uri, cfg.tracking.uri)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(decode_arrays({"image": raw}, info.columns)["image"]))
    probs = np.stack(out["probabilities"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), rtol=1e-4, atol=1e-6)
    assert (out["label"].to_numpy() == logits.argmax(-1).numpy()).all()
    assert len(set(out["label"])) > 1            # a trained model, not a constant

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "platform")}
    server = subprocess.Popen([sys.executable, "-m", "methodlab.cli", "serve", model_uri, "--port", str(port),
                               "--tracking-uri", cfg.tracking.uri], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": raw.tolist()}, server, time.time() + 240)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    rows = answer["predictions"]
    assert [r["label"] for r in rows] == out["label"].tolist()
    np.testing.assert_allclose(np.array([r["probabilities"] for r in rows]), probs, rtol=1e-5)
