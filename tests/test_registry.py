"""Registry-driven tests for every table, as timm's tests/test_models.py: every architecture is
built, run, saved and loaded; every built-in dataset is built, opened and checked; every method's
job YAML validates. A toy sixth method, defined below and nowhere else, passes the registry-driven
method tests of the other files with no file of the library touched."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field

from methodlab import registry
from methodlab.config import Section, load_config
from methodlab.data import open_dataset, prepare_builtin, read_split, read_table
from methodlab.errors import ConfigError
from methodlab.methods.base import Method, StepContext, classify_accuracy
from methodlab.models import build_model
from methodlab.models.hub import load_pretrained, save_pretrained
from methodlab.registry import dataset_names, get_method, method_names, model_example, model_names
from tests import test_core, test_methods, test_sweep
from tests.conftest import spawn_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JOBS = Path(__file__).resolve().parents[1] / "jobs"


# ----------------------------------------------------------------------------------------------
# Architectures: build -> forward -> save -> load (weights_only) -> the same outputs


@pytest.mark.parametrize("arch", model_names())
def test_every_architecture_builds_runs_saves_and_loads(arch, tmp_path):
    example = model_example(arch)
    assert example, f"@register_model({arch!r}) declares no example (kwargs and input) to test it with"
    spec = {"arch": arch, "kwargs": example["kwargs"]}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(*example["input"])
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == x.shape[0] and torch.isfinite(out).all()
    save_pretrained(model, spec, str(tmp_path / "model.pt"))
    loaded, loaded_spec = load_pretrained(str(tmp_path / "model.pt"))
    assert loaded_spec == spec
    with torch.no_grad():
        again = loaded.eval()(x)
    torch.testing.assert_close(again[0] if isinstance(again, tuple) else again, out, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Built-in datasets: build -> open -> schema, and a second prepare reuses the copy


@pytest.mark.parametrize("name", dataset_names())
def test_every_builtin_dataset_builds_opens_and_matches_its_manifest(name, tmp_path):
    info = prepare_builtin(name, str(tmp_path))
    assert info.name == name and {"train", "val", "test"} <= set(info.splits)
    assert "label" in info.columns and info.num_classes >= 2
    for split in info.splits:
        rows = read_split(info, split)
        assert rows.keys() == info.columns.keys()
        lengths = {len(v) for v in rows.values()}
        assert len(lengths) == 1 and lengths.pop() > 0, f"{name}/{split}: columns of unequal length"
        for column, col in info.columns.items():
            assert rows[column].dtype == np.dtype(col.dtype) and list(rows[column].shape[1:]) == col.shape
        assert rows["label"].min() >= 0 and rows["label"].max() < info.num_classes
    for table in info.tables:
        assert read_table(info, table)
    manifest = Path(info.uri) / "dataset.json"
    written = manifest.stat().st_mtime_ns
    assert prepare_builtin(name, str(tmp_path)).name == name
    assert manifest.stat().st_mtime_ns == written, "a prepared dataset was written again"
    assert open_dataset(info.uri).columns == info.columns


# ----------------------------------------------------------------------------------------------
# Methods: every method's job config validates (the sweep files have test_sweep.py)


@pytest.mark.parametrize("name", method_names())
def test_every_method_has_a_job_config_that_validates(name):
    path = JOBS / "configs" / f"{name}.yaml"
    assert path.exists(), f"no jobs/configs/{name}.yaml"
    assert load_config(name, str(path)).method_name == name


# ----------------------------------------------------------------------------------------------
# The tables themselves


def test_old_names_resolve_to_the_current_entries():
    assert registry.get_dataset_builder("digits-gzsl") is registry.get_dataset_builder("digits_gzsl")
    assert registry.get_model_builder("gzsl-classifier") is registry.get_model_builder("gzsl_classifier")
    assert "digits-gzsl" not in dataset_names()          # listed once, under the current name


def test_names_are_snake_case():
    for name in [*method_names(), *model_names(), *dataset_names()]:
        assert name == name.lower() and "-" not in name and " " not in name, name


def test_a_name_taken_twice_is_refused_and_a_typo_gets_a_hint():
    table = registry.Table("thing", "x.thing", "nowhere")
    table.register("alpha", aliases=("old-alpha",))(object())
    for taken in ("alpha", "old-alpha"):
        with pytest.raises(ValueError, match="registered twice"):
            table.register(taken)(object())
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        table.get("alpah")
    with pytest.raises(ConfigError, match="import nowhere first"):
        registry.Table("thing", "x.thing", "nowhere").get("alpha")


# ----------------------------------------------------------------------------------------------
# A toy sixth method: what CONTRIBUTING.md's "Adding a method" builds, passing the registry-driven
# tests of tests/test_methods.py, test_core.py and test_sweep.py by registering alone.


class MixupConfig(Section):
    arch: str = Field("cnn", description="a registered architecture (`methodlab models`)")
    arch_kwargs: dict = Field(default_factory=dict, description="e.g. {width: 32}")
    alpha: float = Field(0.2, gt=0, description="Beta(alpha, alpha) mixing coefficient")


class Mixup(Method):
    """mixup (Zhang et al., ICLR 2018, arXiv:1710.09412; facebookresearch/mixup-cifar10
    train.py `mixup_data`/`mixup_criterion`): train on convex combinations of image pairs and
    of their labels."""

    Config = MixupConfig
    defaults = {"train": {"epochs": 3, "batch_size": 64, "lr": 2e-3}}
    search_space = {"method.alpha": {"uniform": [0.1, 1.0]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}
    smoke_overrides = ["train.epochs=1", "data.limit_rows=200", "method.arch_kwargs={width: 4, embed_dim: 8}"]

    def spec(self) -> dict:
        kwargs = {"in_channels": self.data.info.columns["image"].shape[0],
                  "num_classes": self.data.info.num_classes, **self.mcfg.arch_kwargs}
        return {"arch": self.mcfg.arch, "kwargs": kwargs}

    def build_models(self, stage, previous):
        return {"net": build_model(self.spec())}

    def train_step(self, stage, models, optimizers, batch, ctx: StepContext):
        lam = float(np.random.beta(self.mcfg.alpha, self.mcfg.alpha))    # the seeded numpy RNG
        perm = torch.randperm(len(batch["label"]), device=batch["label"].device)
        with ctx.autocast():
            mixed = lam * batch["image"] + (1 - lam) * batch["image"][perm]   # (B, C, H, W)
            logits = models["net"](mixed).float()                               # (B, num_classes)
            loss = lam * F.cross_entropy(logits, batch["label"]) + \
                (1 - lam) * F.cross_entropy(logits, batch["label"][perm])
        optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["opt"].step()
        return {"loss": loss.detach()}

    def evaluate(self, stage, models, split, device):
        return {f"{split}_acc": classify_accuracy(models["net"], self.data.splits[split], device)}

    def export(self, models):
        return models["net"], self.spec()


TOY = "toy_mixup"


@contextmanager
def toy_registered():
    """The toy in the method table for the duration, as its module's decorator would put it."""
    registry.register_method(TOY)(Mixup)
    try:
        yield
    finally:
        registry.METHODS.entries.pop(TOY)
        registry.METHODS.meta.pop(TOY)


def _toy_sharded_evaluation() -> dict:
    with toy_registered():
        method = test_core._method(TOY)
        models = test_core._final_stage_models(method)
        return {**method.evaluate("train", models, "val", test_core.CPU),
                **method.evaluate("train", models, "test", test_core.CPU)}


def test_a_toy_sixth_method_passes_the_registry_driven_tests(home, tmp_path):
    with toy_registered():
        assert TOY in method_names() and get_method(TOY) is Mixup
        test_methods.test_method_declares_the_interface(TOY)
        test_methods.test_search_space_keys_are_config_keys(TOY)
        test_methods.test_smoke_overrides_resolve(TOY)
        test_sweep.test_every_method_default_space_validates(TOY)
        test_core.test_mid_epoch_resume_ends_with_the_weights_of_an_uninterrupted_run(home, TOY)
        # Its two YAML files, as CONTRIBUTING.md has them, validate like the shipped ones.
        config = tmp_path / f"{TOY}.yaml"
        config.write_text(yaml.safe_dump({"method": {"alpha": 0.4}, "train": {"epochs": 4}}))
        assert load_config(TOY, str(config)).method.alpha == 0.4
        sweep = tmp_path / f"{TOY}_sweep.yaml"
        sweep.write_text(yaml.safe_dump({"method_name": TOY, "name": "toy-alpha",
                                         "space": {"method.alpha": {"uniform": [0.1, 0.5]}},
                                         "search": {"num_samples": 2}}))
        spec, space = test_sweep._validate(TOY, str(sweep))
        assert spec.name == "toy-alpha" and set(space) == {"method.alpha", "train.lr"}
    # Sharded evaluation, world size 1 against 2 (each spawned rank registers the toy itself).
    single = _toy_sharded_evaluation()
    ranks = spawn_world(_toy_sharded_evaluation, 2)
    assert ranks[0] == ranks[1]
    for key, value in single.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-12), key
    assert TOY not in method_names()
