"""The platform's own sweeps choose the benchmarks' hyperparameters (issue 19, item 4).

For each variant a benchmark compares (the method and each of its baselines), one `methodlab
sweep` (`methodlab.sweep.run_sweep`: Ray Tune, ASHA on the validation metric, every trial a
Ray Train run recorded in MLflow as a child of the sweep's run) over that variant's own
learning rate. Every variant of a benchmark gets the same budget: the same range of its
learning rate (the one dimension swept), the same number of trials, epochs, sampler seed and
ASHA rungs, so no method is tuned more than its baseline. A variant with nothing to train (a
frozen predictor) is recorded as such. The choices go to bench/results/tuned.json
({bench: {variant key: {sweep, parent_run_id, params, metric, value, trials, trial_epochs,
stopped_early, budget}}}), which the benchmark reads (`common.tuned`) and the quality table
names (`common.tuned_by`). The sweeps stay in the MLflow store under $METHODLAB_HOME (default
.methodlab), experiment `methodlab`, named `tune-<bench>-<variant key>`; the best trial of each
is registered as `methodlab-bench-tune`, not as the method's own model.

    .venv/bin/python bench/tune.py                               # every benchmark it knows
    .venv/bin/python bench/tune.py canonicalization              # C4 and C8, 6 trials each
    .venv/bin/python bench/tune.py canonicalization --trials 8 --groups 4
    .venv/bin/python bench/tune.py toast                         # linear, finetune, toast on shapes_transfer
    .venv/bin/python bench/tune.py mmanet                        # its 4 variants on shapes_multimodal

Each study has its own task, epochs and learning-rate range (`STUDIES`); within a study they are
the same for every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Ray's socket paths must stay under 107 bytes: a short temp dir of its own.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="mltune-"))

from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from common import TUNED, variant_key  # noqa: E402
from methodlab.config import load_config, methodlab_home  # noqa: E402

REGISTERED = "methodlab-bench-tune"


def canonicalization_variants(args) -> dict[str, tuple[list[str], str | None]]:
    """{variant key: (overrides, the key swept or None: nothing to train)} as
    bench/canonicalization.py names them (`<mode>_c<n>`)."""
    from canonicalization import MODES

    swept = {"plain": None, "group_average": None,            # a frozen predictor: nothing trains
             "augment": "train.lr",                           # the predictor, fine-tuned
             "equivariant": "method.canonicalizer_lr", "canonicalize": "method.canonicalizer_lr"}
    return {f"{mode}_c{n}": ([*overrides, f"method.num_rotations={n}"], swept[mode])
            for n in args.groups for mode, overrides in MODES.items()}


def canonicalization_base(args, workdir: str) -> list[str]:
    """What every canonicalization sweep shares: the upright predictor bench/canonicalization.py
    trains (seed 0, the same epochs), saved once where every trial reads it, and its budget."""
    import torch
    from canonicalization import BATCH, train_in_process

    from methodlab.data import prepare_builtin
    from methodlab.models.hub import save_pretrained
    from methodlab.train.core import load_bundle

    path = os.path.join(workdir, f"supervised-upright-{args.dataset}-{args.supervised_epochs}ep.pt")
    if not os.path.exists(path):
        torch.set_num_threads(1)
        cfg = load_config("canonicalization", None, [f"data.dataset={args.dataset}"])
        data = load_bundle(cfg, prepare_builtin(args.dataset, cfg.data.root), ["train", "val", "test"])
        sup, models = train_in_process("supervised", ["train.seed=0", f"data.dataset={args.dataset}"], data,
                                       args.supervised_epochs)
        save_pretrained(*sup.export(models), path)
    return [f"data.dataset={args.dataset}", f"method.predictor={path}", f"train.epochs={args.epochs}",
            f"train.batch_size={BATCH}", "train.eval_every=1"]


# TOAST on the richer source task, as bench/toast.py's shapes run (toast_shapes.json) measures it.
TOAST_TASK = {"source": "shapes_source", "dataset": "shapes_transfer", "patch_size": 8, "source_epochs": 20,
              "pretune_epochs": 3}
TOAST_MODES = ["linear", "finetune", "toast"]


def toast_variants(args) -> dict[str, tuple[list[str], str | None]]:
    return {variant_key(mode, args.dataset): ([f"method.mode={mode}"], "train.lr") for mode in TOAST_MODES}


def toast_base(args, workdir: str) -> list[str]:
    """The source backbone bench/toast.py pretrains (the same settings and seed), saved once."""
    import torch
    from toast import SCRATCH_VIT, pretrain_source

    vit = {**SCRATCH_VIT, "patch_size": TOAST_TASK["patch_size"]}     # bench/toast.py's defaults, --patch-size 8
    path = os.path.join(workdir, f"vit-{TOAST_TASK['source']}-{TOAST_TASK['source_epochs']}ep-p{vit['patch_size']}.pt")
    if not os.path.exists(path):
        torch.set_num_threads(1)
        print(f"source backbone: {pretrain_source(TOAST_TASK['source'], vit, TOAST_TASK['source_epochs'], path)}")
    return [f"data.dataset={args.dataset}", f"method.backbone={path}", f"train.epochs={args.epochs}",
            f"method.pretune_epochs={TOAST_TASK['pretune_epochs']}", "train.eval_every=1"]


# MMANet on the task built for it, as bench/mmanet.py's shapes run (mmanet_shapes.json) measures it
# (every epoch evaluated here: ASHA needs the val metric per epoch; the bench scores the last).
MMANET_TASK = {"dataset": "shapes_multimodal", "set": ["method.width=4", "method.teacher_epochs=4"], "epochs": 9}


def mmanet_variants(args) -> dict[str, tuple[list[str], str | None]]:
    from mmanet import VARIANTS

    return {variant_key(v, args.dataset): (overrides, "train.lr") for v, overrides in VARIANTS.items()}


def mmanet_base(args, workdir: str) -> list[str]:
    from mmanet import BENCH

    return [f"data.dataset={args.dataset}", *BENCH, *MMANET_TASK["set"], f"train.epochs={args.epochs}",
            "train.eval_every=1"]


@dataclass(frozen=True)
class Study:
    """What one benchmark's sweeps share: its variants, their common overrides, the task, the
    epochs per trial and the range every variant's learning rate is searched over."""
    variants: Callable[..., dict[str, tuple[list[str], str | None]]]
    base: Callable[..., list[str]]
    dataset: str
    epochs: int
    lr_range: tuple[float, float]


STUDIES = {
    "canonicalization": Study(canonicalization_variants, canonicalization_base, "digits", 5, (1e-4, 3e-2)),
    # The 1e-3 ... 1e-1 for every TOAST mode, a half-decade wider each way.
    "toast": Study(toast_variants, toast_base, TOAST_TASK["dataset"], 30, (3e-4, 3e-1)),
    # A decade either side of the method's default 2e-3. train.lr is the teacher's too: a trial
    # trains both stages at its lr, and bench/mmanet.py trains a variant's teacher at its choice.
    "mmanet": Study(mmanet_variants, mmanet_base, MMANET_TASK["dataset"], MMANET_TASK["epochs"], (2e-4, 2e-2)),
}
GRACE, REDUCTION, SAMPLER_SEED = 1, 2, 0     # ASHA's rungs and the sampler: the same for every variant


def sweep_overrides(bench: str, key: str, base: list[str], overrides: list[str], swept: str, args) -> list[str]:
    """One variant's sweep: only `swept` is searched (the method's default space is switched
    off), with the budget every variant of `bench` shares."""
    from methodlab.registry import get_method

    low, high = STUDIES[bench].lr_range
    off = [f"space.{k}=null" for k in get_method(bench).search_space if k != swept]
    return [*base, *overrides, *off, f"space.{swept}={{loguniform: [{low:.1e}, {high:.1e}]}}",
            f"name=tune-{bench}-{key.replace('_', '-')}", f"search.num_samples={args.trials}",
            f"search.seed={SAMPLER_SEED}", "search.scheduler.type=asha", f"search.scheduler.grace_period={GRACE}",
            f"search.scheduler.reduction_factor={REDUCTION}",
            "scaling.num_workers=1", f"scaling.cpus_per_worker={args.cpus_per_trial}",
            f"tracking.registered_model={REGISTERED}"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", nargs="*", choices=sorted(STUDIES), help="default: every benchmark tune.py knows")
    p.add_argument("--dataset", help="default: the study's (canonicalization digits, toast shapes_transfer, mmanet shapes_multimodal)")
    p.add_argument("--trials", type=int, default=6, help="trials per variant (the same for every variant)")
    p.add_argument("--epochs", type=int, help="epochs per trial; default: the benchmark's (5; toast 30; mmanet 9)")
    p.add_argument("--supervised-epochs", type=int, default=10)
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    p.add_argument("--cpus-per-trial", type=float, default=0.9)
    args = p.parse_args(argv)

    from methodlab.sweep import run_sweep

    workdir = str(methodlab_home() / "bench-tune")
    os.makedirs(workdir, exist_ok=True)
    chosen = json.loads(TUNED.read_text()) if TUNED.exists() else {}
    for bench in args.bench or sorted(STUDIES):
        study = STUDIES[bench]
        study_args = argparse.Namespace(**{**vars(args), "dataset": args.dataset or study.dataset,
                                           "epochs": args.epochs or study.epochs})
        budget = {"trials": args.trials, "epochs": study_args.epochs, "space": f"loguniform {list(study.lr_range)}",
                  "scheduler": f"asha (grace {GRACE}, reduction {REDUCTION})", "sampler_seed": SAMPLER_SEED,
                  "dataset": study_args.dataset}
        tune_bench(bench, study_args, workdir, budget, chosen, run_sweep)
    print(f"wrote {TUNED}")


def tune_bench(bench: str, args, workdir: str, budget: dict, chosen: dict, run_sweep) -> None:
    """Sweep every variant of `bench`; tuned.json is rewritten after each sweep (nothing lost)."""
    study = STUDIES[bench]
    base = study.base(args, workdir)
    out = chosen.setdefault(bench, {})
    for key, (overrides, swept) in study.variants(args).items():
        if swept is None:
            out[key] = {"sweep": None, "params": {}, "note": "nothing to tune: a frozen predictor"}
            continue
        t0 = time.perf_counter()
        s = run_sweep(bench, None, sweep_overrides(bench, key, base, overrides, swept, args))
        print(s.line(), f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if s.already_finished and out.get(key, {}).get("parent_run_id") == s.parent_run_id:
            continue                                  # swept before: its choice is in tuned.json
        if s.already_finished:
            raise SystemExit(f"error: sweep {s.name} finished before (MLflow run {s.parent_run_id}) but "
                             f"{TUNED} has no choice from it: delete that run and its folder to sweep again")
        if s.best is None:
            raise SystemExit(f"error: sweep {s.name} had no trial that reported {s.metric}")
        out[key] = {"sweep": s.name, "parent_run_id": s.parent_run_id, "params": s.best.params,
                    "metric": s.metric, "value": s.best.metric, "trials": len(s.trials),
                    "trial_epochs": s.trial_epochs, "stopped_early": sum(t.stopped_early for t in s.trials),
                    "budget": budget, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        TUNED.write_text(json.dumps(chosen, indent=1, sort_keys=True))
    TUNED.write_text(json.dumps(chosen, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
