"""Registry-driven tests: every registered method is checked here, so a new method is tested the
moment it registers. Method-specific properties live in tests/test_<method>.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methodlab.config import load_config
from methodlab.registry import get_method, method_names
from methodlab.tracking import Tracker
from tests.conftest import epochs_logged, tiny

METHODS = method_names()


def _sample(spec: dict):
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return arg[0]
    low, high = arg[:2]
    return math.sqrt(low * high) if kind == "loguniform" else (low + high) / 2


@pytest.mark.parametrize("name", METHODS)
def test_method_declares_the_interface(name):
    method = get_method(name)
    assert method.stages and len(set(method.stages)) == len(method.stages)
    assert method.mode in ("max", "min")
    assert method.metric.startswith("val_") and method.test_metric.startswith("test_")
    cfg = load_config(name)
    assert cfg.method_name == name
    assert method.search_space, f"{name} has no default Tune search space"


@pytest.mark.parametrize("name", METHODS)
def test_search_space_keys_are_config_keys(name):
    for key, spec in get_method(name).search_space.items():
        value = _sample(spec)
        cfg = load_config(name, None, [f"{key}={value}"])
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == pytest.approx(value) if isinstance(value, float) else node == value


@pytest.mark.parametrize("name", METHODS)
def test_smoke_overrides_resolve(name):
    cfg = load_config(name, None, tiny(name))
    assert cfg.run_name.startswith(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_two_worker_run_trains_registers_and_reloads(ray_cluster, home, name):
    from methodlab.models.hub import load_pretrained
    from methodlab.train.launch import train

    method = get_method(name)
    cfg = load_config(name, None, tiny(name, "scaling.num_workers=2"))
    summary = train(cfg)
    assert summary.status == "FINISHED"
    assert summary.version == "1"
    assert method.metric in summary.metrics and method.test_metric in summary.metrics
    assert all(math.isfinite(v) for v in summary.metrics.values())
    run = Tracker(cfg.tracking.uri, cfg.tracking.experiment).client.get_run(summary.run_id)
    # The registered model is the best evaluated epoch of the final stage (tracking.register=best).
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    by_stage = method.epochs_by_stage(cfg)
    epochs = sum(by_stage.values())
    assert 1 <= int(run.data.tags["methodlab.registered_epoch"]) <= epochs
    # One step axis: every epoch once, at the global optimizer step at its end; the stages but the
    # last under their names (their charts grouped by them); the method's metric the last stage's.
    assert list(tracker.logged_epochs(summary.run_id)) == list(range(1, epochs + 1))
    last = method.stages[-1]
    for stage in method.stages:
        key = "epoch_seconds" if stage == last else f"{stage}/epoch_seconds"
        assert len(epochs_logged(tracker.client, summary.run_id, key)) == by_stage[stage], key
    assert not {"epoch", "step"} & set(summary.metrics)
    assert epochs_logged(tracker.client, summary.run_id, method.metric)[-1] == epochs
    assert run.data.params["data.dataset"] == run.data.tags["methodlab.dataset"] == (
        cfg.data.dataset or method.default_dataset)
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    assert run.data.params["train.global_batch_size"] == str(2 * cfg.train.batch_size)
    assert summary.metrics["time_step_s"] > 0 and "startup_s" in summary.metrics
    # every method logs a diagnostic chart per run
    client = Tracker(cfg.tracking.uri, cfg.tracking.experiment).client

    def files(path=None):
        for a in client.list_artifacts(summary.run_id, path):
            yield from files(a.path) if a.is_dir else [a.path]
    charts = [p for p in files() if p.endswith(".png")]
    assert charts, f"{name} logged no chart"
    from matplotlib.image import imread
    for chart in charts:                    # a real picture, not an empty canvas
        image = imread(client.download_artifacts(summary.run_id, chart, str(home)))
        assert image.ndim == 3 and min(image.shape[:2]) >= 100 and image[..., :3].std() > 0, chart

    model, spec = load_pretrained(f"models:/{cfg.tracking.registered_model}@candidate", cfg.tracking.uri)
    from methodlab.data import resolve_dataset, read_split
    info = resolve_dataset(cfg.data.dataset or method.default_dataset, cfg.data.root)
    from methodlab.data.decode import decode_arrays
    example = {k: torch.from_numpy(v[:3]) for k, v in decode_arrays(read_split(info, "test"), info.columns).items()}
    inputs = example[getattr(method, "export_input", "image")]
    with torch.no_grad():
        out = model.eval()(inputs)
    assert out.shape[0] == 3 and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", METHODS)
def test_gpu_worker_trains_with_bf16_autocast(ray_cluster, home, name):
    """The GPU path (bf16 autocast, pinned non-blocking copies, channels-last convolutions) on
    one GPU worker; skipped on CPU-only machines, run on a GPU one by `make test`."""
    from methodlab.train.launch import train

    cfg = load_config(name, None, tiny(name, "scaling.num_workers=1", "scaling.use_gpu=true"))
    summary = train(cfg)
    assert summary.status == "FINISHED"
    assert all(math.isfinite(v) for v in summary.metrics.values())


def test_place_model_keeps_cpu_models_contiguous_and_moves_them():
    from methodlab.models.resnet import ResNet
    from methodlab.train.core import place_model

    model = place_model(ResNet(in_channels=1, num_classes=3), torch.device("cpu"))
    # a convolution with several input channels, where the two layouts differ
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
            and m.kernel_size != (1, 1)][-1]
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        model = place_model(model, torch.device("cuda"))
        assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_supervised_fine_tunes_an_imported_backbone_with_a_fresh_head(tmp_path):
    """method.init: the pretrained body (and the normalization its spec carries) with a new head."""
    import torch

    from methodlab.config import load_config
    from methodlab.data import resolve_dataset
    from methodlab.errors import ConfigError
    from methodlab.methods.base import DataBundle
    from methodlab.methods.supervised import Supervised
    from methodlab.models import build_model
    from methodlab.models.hub import save_pretrained
    from methodlab.train.core import load_bundle

    spec = {"arch": "resnet", "kwargs": {"in_channels": 1, "num_classes": 1000, "width": 4, "blocks": [1, 1],
                                         "input_mean": [0.2], "input_std": [0.3]}}
    torch.manual_seed(1)
    source = build_model(spec)
    save_pretrained(source, spec, str(tmp_path / "r.pt"))
    cfg = load_config("supervised", None, [f"method.init={tmp_path / 'r.pt'}"])
    bundle = load_bundle(cfg, resolve_dataset("digits", cfg.data.root), ["train", "val", "test"])
    net = Supervised(cfg, bundle).build_models("train", {})["net"]
    assert net.head.out_features == 10 and net.normalize.enabled
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(net.state_dict()[k], v), k
    # a normalizing backbone on standardized data is refused, before any step
    cfg = load_config("supervised", None, [f"method.init={tmp_path / 'r.pt'}", "data.normalize=true"])
    with pytest.raises(ConfigError, match="data.normalize=false"):
        Supervised(cfg, DataBundle(bundle.info, bundle.splits, bundle.tables)).build_models("train", {})


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_confusion_counts_match_sklearn_and_shards_add_up(k, n, seed):
    from sklearn.metrics import confusion_matrix

    from methodlab.metrics.confusion import confusion_counts

    g = torch.Generator().manual_seed(seed)
    preds, labels = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    counts = confusion_counts(preds, labels, k)
    assert counts.shape == (k, k) and counts.sum() == n
    if n:                   # sklearn refuses an empty input; zero counts are checked by the sum
        np.testing.assert_array_equal(counts.numpy(), confusion_matrix(labels.numpy(), preds.numpy(), labels=range(k)))
    half = n // 2
    torch.testing.assert_close(confusion_counts(preds[:half], labels[:half], k)
                               + confusion_counts(preds[half:], labels[half:], k), counts)


def test_supervised_test_accuracy_is_the_confusion_diagonal_and_is_charted():
    from methodlab.config import load_config
    from methodlab.data import resolve_dataset
    from methodlab.methods.base import classify_accuracy
    from methodlab.methods.supervised import Supervised
    from methodlab.train.core import load_bundle

    cfg = load_config("supervised", None, ["train.epochs=1"])
    method = Supervised(cfg, load_bundle(cfg, resolve_dataset("digits", cfg.data.root), ["train", "val", "test"]))
    net = method.build_models("train", {})["net"]
    got = method.evaluate("train", {"net": net}, "test", torch.device("cpu"))["test_acc"]
    assert got == pytest.approx(classify_accuracy(net, method.data.splits["test"], torch.device("cpu")))
    assert method.confusion.sum() == len(method.data.splits["test"])
    (name, figure), = method.epoch_artifacts("train", 0).items()
    assert name == "confusion_test.png" and "accuracy" in figure.axes[0].get_title()
