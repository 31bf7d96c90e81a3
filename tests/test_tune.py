"""bench/tune.py: the sweeps that choose the benchmarks' hyperparameters give every variant of a
benchmark the same budget, and what they choose is what the benchmark trains with."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

from .conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import tune  # noqa: E402

ARGS = SimpleNamespace(groups=[4, 8], trials=6, epochs=5, cpus_per_trial=0.9, dataset="digits")
BASE = {"canonicalization": ["data.dataset=digits", "method.predictor=scratch", "train.epochs=5",
                             "train.batch_size=128", "train.eval_every=1"],
        "toast": ["data.dataset=digits_transfer", "method.backbone=scratch", "train.epochs=5",
                  "method.pretune_epochs=1", "train.eval_every=1"],
        "mmanet": ["data.dataset=digits_multimodal", "method.teacher_epochs=1", "train.epochs=2", "train.eval_every=1"]}


def _sweeps(bench: str):
    """{variant key: (its spec, its space, its swept key)} for every variant with something to train."""
    from methodlab.sweep import load_spec, merged_space

    out = {}
    for key, (overrides, swept) in tune.STUDIES[bench].variants(ARGS).items():
        if swept is not None:
            spec, _ = load_spec(bench, None, tune.sweep_overrides(bench, key, BASE[bench], overrides, swept, ARGS))
            out[key] = (spec, merged_space(bench, spec), swept)
    return out


@pytest.mark.parametrize("bench", sorted(tune.STUDIES))
def test_every_variant_of_a_benchmark_is_swept_with_the_same_budget(bench):
    sweeps = _sweeps(bench)
    assert sweeps, "nothing is swept"
    budgets = set()
    for key, (spec, space, swept) in sweeps.items():
        assert list(space) == [swept], (key, space)          # one dimension: its own learning rate
        assert space[swept] == {"loguniform": list(tune.STUDIES[bench].lr_range)}, (key, space)
        s = spec.search
        budgets.add((s.num_samples, s.seed, s.algorithm, s.scheduler.type, s.scheduler.grace_period,
                     s.scheduler.reduction_factor, s.scheduler.max_t))
        assert spec.name == f"tune-{bench}-{key.replace('_', '-')}"
    assert len(budgets) == 1, budgets                          # no method tuned more than its baseline


def test_what_a_sweep_chose_is_what_the_benchmark_trains_with(tmp_path, monkeypatch):
    from methodlab.config import load_config

    entry = {"sweep": "tune-canonicalization-canonicalize-c4", "params": {"method.canonicalizer_lr": 0.0031},
             "budget": {"trials": 6}}
    monkeypatch.setattr(common, "TUNED", tmp_path / "tuned.json")
    (tmp_path / "tuned.json").write_text(__import__("json").dumps({"canonicalization": {"canonicalize_c4": entry}}))
    chosen = common.tuned("canonicalization")
    cfg = load_config("canonicalization", None, ["method.predictor=scratch", *common.tuned_overrides(chosen["canonicalize_c4"])])
    assert cfg.method.canonicalizer_lr == pytest.approx(0.0031)
    assert common.tuned_overrides(chosen.get("plain_c4")) == []
    assert common.tuned_by(chosen["canonicalize_c4"]) == "sweep tune-canonicalization-canonicalize-c4 (method.canonicalizer_lr=0.0031)"
    assert common.tuned_by(None).startswith("not swept")
    assert common.tuned("toast") == {}
