"""`methodlab models import`: timm / torchvision / TOAST state dicts into methodlab architectures.

Parity: every registered weights source (`methodlab.models.sources`) is built by its own library
with random weights in the reference venv (tests/reference/make_references.py, `make
reference-venv`), saved as the library saves it, imported through the CLI, and must give the
library's logits in eval mode (max abs diff <= 1e-5, float32). A new source is tested by
registering. Bad input (another architecture, a truncated or pickled file) is one line with
nothing written or registered.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methodlab.cli import main
from methodlab.models.hub import load_pretrained
from methodlab.models.sources import SOURCES, get_source, source_names
from methodlab.models.vit import TopDownViT

from .conftest import ROOT

SCRIPT = Path(ROOT) / "tests" / "reference" / "make_references.py"
LIBRARY_SOURCES = [n for n in source_names() if get_source(n).reference["library"] in ("timm", "torchvision")]
TOL = 1e-5


def _reference_python() -> str:
    python = os.environ.get("METHODLAB_REFERENCE_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
    if not os.path.exists(python):
        pytest.fail(f"no reference venv at {python}: run `make reference-venv` (make test does)")
    return python


@pytest.fixture(scope="session")
def references() -> Path:
    """The libraries' files and outputs, made once per script, source list and venv (cached
    under .methodlab/reference: 3.7 GB, 40 s to make)."""
    python = _reference_python()
    listing = [{"name": n, **{"library": get_source(n).reference["library"], "model": get_source(n).reference["name"]}}
               for n in source_names()]
    key = hashlib.sha256(SCRIPT.read_bytes() + json.dumps(listing).encode() + python.encode()).hexdigest()[:16]
    out = Path(ROOT) / ".methodlab" / "reference" / key
    if not (out / "DONE").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "sources.json").write_text(json.dumps(listing))
        subprocess.run([python, str(SCRIPT), "--sources", str(out / "sources.json"), "--out", str(out)],
                       check=True, timeout=900)
    return out


def _files(references: Path, name: str) -> tuple[Path, dict]:
    stem = references / name.replace(":", "--")
    return Path(f"{stem}.pth"), torch.load(f"{stem}.out.pt", weights_only=True)


def _import(*args: str) -> int:
    return main(["models", "import", *args])


# ----------------------------------------------------------------------------------------------
# Parity with the real libraries


@pytest.mark.slow
@pytest.mark.parametrize("name", LIBRARY_SOURCES)
def test_every_source_gives_its_librarys_logits(name, references, tmp_path, capsys):
    weights, ref = _files(references, name)
    assert _import(str(weights), "--from", name, "--out", str(tmp_path / "m.pt")) == 0
    assert f"imported {name}" in capsys.readouterr().out
    model, spec = load_pretrained(str(tmp_path / "m.pt"))          # the file the user gets, reloaded
    with torch.no_grad():
        logits = model.eval()(ref["x"])                              # raw [0, 1] images: the model normalizes
    assert (logits - ref["logits"]).abs().max().item() <= TOL * max(1.0, ref["logits"].abs().max().item())
    # the normalization the library publishes for these weights travels in the spec
    assert spec["kwargs"]["input_mean"] == pytest.approx(ref["mean"]) and spec["kwargs"]["input_std"] == pytest.approx(ref["std"])
    assert spec["input"]["shape"] == [3, 224, 224] and spec["source"]["from"] == name


@pytest.mark.slow
def test_toast_first_bottom_up_pass_equals_timm_forward_features(references):
    from methodlab.models.sources import convert

    weights, ref = _files(references, "timm:vit_base_patch16_224")
    converted = convert(str(weights), "timm:vit_base_patch16_224")
    vit, kwargs = converted.model, {k: v for k, v in converted.spec["kwargs"].items() if k != "num_classes"}
    toast = TopDownViT(kwargs, num_classes=5).eval()
    toast.backbone.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
    tokens = toast.bottom_up(toast.backbone.tokens_in(ref["x"]))     # (2, 197, 768)
    assert (tokens - ref["features"]).abs().max().item() <= TOL


@pytest.mark.slow
def test_other_input_sizes_interpolate_position_embeddings_as_timm_does(references, tmp_path):
    stem = references / "timm--vit_base_patch16_224"
    ref = torch.load(f"{stem}.at32.out.pt", weights_only=True)
    # the safetensors copy of the same weights: the other file format, same result
    assert _import(f"{stem}.safetensors", "--from", "timm:vit_base_patch16_224", "--img-size", "32",
                   "--out", str(tmp_path / "m.pt")) == 0
    model, spec = load_pretrained(str(tmp_path / "m.pt"))
    assert spec["kwargs"]["img_size"] == 32 and model.pos_embed.shape == (1, 5, 768)
    with torch.no_grad():
        assert (model.eval()(ref["x"]) - ref["logits"]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------
# TOAST's released checkpoints: their layout, written here with random weights


def _toast_checkpoint(path: Path, with_transform: bool = True, depth: int = 12, dim: int = 768) -> dict:
    """A file in the layout of bfshi/TOAST's pretuned ViT-B (DeiT/AbSViT main.py's checkpoint:
    {"model", "optimizer", "lr_scheduler", "epoch", "model_ema", "scaler", "args"}), keys as in
    vit_top_down.py: timm's ViT names plus decoders.{i}.linear/linear2, prompt, P, an IN-1k head."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02      # noqa: E731
    model = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 197, dim),
             "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
             "norm.weight": 1 + r(dim), "norm.bias": r(dim), "head.weight": r(1000, dim), "head.bias": r(1000),
             "prompt": r(dim)}
    if with_transform:
        model["top_down_transform"] = torch.eye(dim) + r(dim, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        model.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                      b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                      b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                      b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                      b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                      b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
                      f"decoders.{i}.linear.weight": r(dim, dim), f"decoders.{i}.linear2.weight": r(dim, dim)})
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "lr_scheduler": {"last_epoch": 9}, "epoch": 9, "model_ema": dict(model), "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="vit_topdown_base_patch16_224", lr=5e-4, epochs=10)}, path)
    return model


# official key -> toast_vit key (from the official vit_top_down.py; see models/sources.py)
def _official_to_ours(key: str) -> str:
    if key.startswith(("decoders.", "head.")) or key in ("prompt", "top_down_transform"):
        return key
    key = key.replace("patch_embed.proj.", "patch_embed.").replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
    return "backbone." + key


@pytest.mark.parametrize("with_transform", [True, False])
def test_toasts_released_checkpoint_layout_loads_into_toast_vit_faithfully(tmp_path, with_transform, capsys):
    official = _toast_checkpoint(tmp_path / "vit_b_topdown.pth", with_transform)
    assert _import(str(tmp_path / "vit_b_topdown.pth"), "--from", "toast:vit_topdown_base_patch16_224",
                   "--out", str(tmp_path / "m.pt")) == 0
    model, spec = load_pretrained(str(tmp_path / "m.pt"))
    assert isinstance(model, TopDownViT) and spec["kwargs"]["value_bias"] == "faithful" == model.value_bias
    ours = model.state_dict()
    for key, value in official.items():
        assert torch.equal(ours[_official_to_ours(key)], value), key
    if not with_transform:          # AbSViT-trained files have no P: the official loader keeps eye(C)
        assert torch.equal(ours["top_down_transform"], torch.eye(768))
    assert len(ours) == len(official) + (0 if with_transform else 1)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file or key, nothing written, nothing registered


def _resnet18_file(path: Path) -> None:
    """torchvision's resnet18 key layout, written from our own converted model's inverse."""
    from methodlab.models.factory import build_model

    source = get_source("torchvision:resnet18")
    ours = build_model({"arch": "resnet", "kwargs": source.kwargs_at(224, 1000, {})}).state_dict()
    names = {}
    for i, n in enumerate((2, 2, 2, 2)):
        for j in range(n):
            names[4 + sum((2, 2, 2, 2)[:i]) + j] = f"layer{i + 1}.{j}"
    out = {}
    for k, v in ours.items():
        if k.startswith("encoder.0."):
            out["conv1." + k.split(".", 2)[2]] = v
        elif k.startswith("encoder.1."):
            out["bn1." + k.split(".", 2)[2]] = v
        elif k.startswith("head."):
            out["fc." + k.split(".", 1)[1]] = v
        else:
            _, idx, rest = k.split(".", 2)
            out[f"{names[int(idx)]}.{rest.replace('shortcut.', 'downsample.')}"] = v
    torch.save(out, path)


def _refused(capsys, *args: str) -> str:
    assert _import(*args) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_a_file_of_another_architecture_is_named_and_nothing_is_written(tmp_path, capsys):
    _resnet18_file(tmp_path / "resnet18.pth")
    out = tmp_path / "m.pt"
    assert _import(str(tmp_path / "resnet18.pth"), "--from", "torchvision:resnet18", "--out", str(out)) == 0
    out.unlink()
    err = _refused(capsys, str(tmp_path / "resnet18.pth"), "--from", "torchvision:resnet50", "--out", str(out))
    assert "resnet18.pth" in err and "layer1.0.conv1.weight" in err and "torchvision:resnet50" in err
    err = _refused(capsys, str(tmp_path / "resnet18.pth"), "--from", "timm:vit_base_patch16_224", "--out", str(out))
    assert "'conv1.weight'" in err or "has no counterpart" in err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_refused(tmp_path, capsys, suffix):
    from safetensors.torch import save_file

    full = tmp_path / f"full{suffix}"
    state = {"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(10, 512)}
    torch.save(state, full) if suffix == ".pth" else save_file(state, str(full))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    err = _refused(capsys, str(cut), "--from", "torchvision:resnet18", "--out", str(tmp_path / "m.pt"))
    assert str(cut) in err and "truncated" in err and not (tmp_path / "m.pt").exists()


class NotWeights:
    def __reduce__(self):           # what a malicious pickle does: call something on load
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    torch.save({"model": NotWeights()}, tmp_path / "evil.pth")
    err = _refused(capsys, str(tmp_path / "evil.pth"), "--from", "torchvision:resnet18", "--out", str(tmp_path / "m.pt"))
    assert "evil.pth" in err and "pickled" in err and ("posix.system" in err or "os.system" in err)


def test_usage_and_unknown_source_are_one_line(tmp_path, capsys):
    _resnet18_file(tmp_path / "r.pth")
    err = _refused(capsys, str(tmp_path / "r.pth"), "--from", "torchvision:resnet18")       # neither --out nor --register
    assert "--register" in err
    err = _refused(capsys, str(tmp_path / "r.pth"), "--from", "torchvision:resnet5", "--out", str(tmp_path / "m.pt"))
    assert "torchvision:resnet50" in err or "torchvision:resnet18" in err      # the close match


def test_every_source_has_a_reference_to_be_tested_against():
    for name, source in SOURCES.entries.items():
        assert source.reference.get("library") in ("timm", "torchvision", "toast"), name
    # every library source is parity-tested above; TOAST's layout by the checkpoint test
    assert set(LIBRARY_SOURCES) | {"toast:vit_topdown_base_patch16_224"} == set(source_names())


# ----------------------------------------------------------------------------------------------
# Registered in MLflow, and trained with TOAST at a reduced input size


@pytest.mark.slow
def test_a_registered_timm_vit_b_trains_with_toast_at_32px(references, ray_cluster, home, tmp_path, capsys):
    import mlflow
    import numpy as np
    from PIL import Image

    from methodlab.config import load_config
    from methodlab.data.imagefolder import import_image_folder
    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    # a small RGB task in the image-folder layout, imported at 32x32
    rng = np.random.default_rng(0)
    for c, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(20):
            img = np.clip(rng.normal(color, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    import_image_folder(str(tmp_path / "imgs"), str(tmp_path / "rgb"), size=32, workers=1)

    weights, _ = _files(references, "timm:vit_base_patch16_224")
    cfg = load_config("toast", None, [f"data.dataset={tmp_path / 'rgb'}", "method.backbone=models:/vit-b16@candidate",
                                      "method.pretune_epochs=0", "train.epochs=1", "train.batch_size=12",
                                      "scaling.num_workers=2", "tracking.registered_model=toast-vit-b16"])
    assert _import(str(weights), "--from", "timm:vit_base_patch16_224", "--img-size", "32",
                   "--register", "vit-b16", "--license", "Apache-2.0 (test)", "--tracking-uri", cfg.tracking.uri) == 0
    assert "models:/vit-b16/1 (alias candidate)" in capsys.readouterr().out
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    version = tracker.client.get_model_version_by_alias("vit-b16", "candidate")
    assert version.tags["methodlab.license"] == "Apache-2.0 (test)"
    assert version.tags["methodlab.imported_from"] == "timm:vit_base_patch16_224"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    info = mlflow.models.get_model_info("models:/vit-b16@candidate")
    assert info.metadata["input"] == {"dtype": "float32", "shape": [-1, 3, 32, 32], "range": [0.0, 1.0],
                                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "normalized_by": "the model"}

    summary = train(cfg)
    assert summary.status == "FINISHED" and 0.0 <= summary.metrics["test_acc"] <= 1.0
    model, exported = load_pretrained("models:/toast-vit-b16@candidate", cfg.tracking.uri)
    assert exported["arch"] == "toast_vit" and exported["kwargs"]["vit"]["embed_dim"] == 768
    assert exported["kwargs"]["vit"]["input_mean"] == [0.5, 0.5, 0.5]      # the normalization came along


# ----------------------------------------------------------------------------------------------
# Invariants of the pieces


@settings(max_examples=30, deadline=None)
@given(old=st.integers(1, 14), new=st.integers(1, 14), dim=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_resampled_position_embeddings_keep_cls_shape_and_constants(old, new, dim, seed):
    from methodlab.models.sources import resample_pos_embed

    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(1, 1 + old * old, dim, generator=g)
    out = resample_pos_embed(pos, new)
    assert out.shape == (1, 1 + new * new, dim) and torch.equal(out[:, 0], pos[:, 0])   # CLS untouched
    if old == new:
        assert torch.equal(out, pos)
    # a position field constant over the grid stays that constant (the resampler is a mean)
    flat = torch.cat([pos[:, :1], pos[:, 1:2].expand(1, old * old, dim)], dim=1)
    torch.testing.assert_close(resample_pos_embed(flat, new)[:, 1:], pos[:, 1:2].expand(1, new * new, dim),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_input_normalization_is_the_per_channel_standardization(c, seed):
    from methodlab.models.layers import InputNormalization

    g = torch.Generator().manual_seed(seed)
    mean, std = torch.rand(c, generator=g).tolist(), (torch.rand(c, generator=g) + 0.1).tolist()
    x = torch.rand(3, c, 5, 5, generator=g)
    expected = (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)
    torch.testing.assert_close(InputNormalization(mean, std)(x), expected)
    assert torch.equal(InputNormalization()(x), x)
    assert not InputNormalization(mean, std).state_dict()          # not persistent: spec-borne
