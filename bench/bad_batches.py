"""Bad Batches, three measurements, each against a baseline measured in this same process:

  1. Fréchet distance: `methodlab.metrics.frechet` (torch, float64) vs the reference formula with
     `scipy.linalg.sqrtm` (pytorch-fid's `calculate_frechet_distance`, covariances included), at
     n in {64, 256, 512} and d in {128, 512, 2048}; speed-up and relative difference of the values.
     Goal: >= 100x at d=2048 with equal values.
  2. Curation overhead: median step time of bad_batches with FRD scoring (online extractor, both
     comparison modes) over plain SimCLR (`curation=none`), steps interleaved. Goal: <= 1.10.
  3. Linear-probe test accuracy of curated (frd_quantile=0.2, the default detrended window) vs
     uncurated SimCLR at batch 32 and 128, `--seeds` seeds, the SAME number of optimizer steps (a
     curated run draws batches until it has taken as many steps), with the dropped fraction of
     each curated run; `--raw-window-seeds` curated runs with the raw window (frd_detrend=none)
     for its dropped fraction. Baselines through the method's own probe and k-NN
     (`BadBatches.evaluate`): raw pixels (deterministic: one value, listed per seed) and the
     encoder at its random initialisation (per seed). Reduced budget to fit the time limit: in
     process (one worker, no Ray), `--steps` optimizer steps, a ResNet of width 8 (default 16).

Results: bench/results/bad_batches.json. `accuracy_runs` -> `batch{bs}_{curated|uncurated}` ->
per-seed dicts (seed, test_linear_acc, test_knn_acc, batches_drawn, optimizer_steps, and
dropped_fraction for curated runs), plus `batch{bs}_curated_raw_window` (same fields);
`baseline_runs` -> `raw_pixel` | `random_init` -> per-seed dicts (seed, test_linear_acc,
test_knn_acc); `preconditions` -> `raw_pixel_probe` | `random_init_probe` -> per-seed linear
accuracies, and `dataset`, as bench/quality.py reads them. `--parts` re-measures some parts only;
the figures of the others are kept from the previous file, and `parts_measured` says when each
part was measured, on which dataset.

One thread throughout (torch and scipy's BLAS), as a Ray worker with one CPU gets (OMP_NUM_THREADS=1).

    .venv/bin/python bench/bad_batches.py                                   # digits, everything
    .venv/bin/python bench/bad_batches.py --dataset shapes --parts accuracy --warmup-epochs 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))
# One BLAS/OpenMP thread for scipy as for torch (set before numpy loads): on a shared 2-core machine
# two spinning BLAS threads made scipy's sqrtm ~10x slower, which would inflate the speed-up.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from torch import nn  # noqa: E402

from common import RESULTS, Figure, mean_std, timeit, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.bad_batches import BadBatches  # noqa: E402
from methodlab.methods.base import StepContext  # noqa: E402
from methodlab.metrics.frechet import frechet_distance  # noqa: E402
from methodlab.train.core import epoch_seed, load_bundle, memory_batches  # noqa: E402

SHAPES = [(n, d) for d in (128, 512, 2048) for n in (64, 256, 512)]
PROBE_ARCH = "method.arch_kwargs={width: 8, blocks: [1, 1, 1]}"
QUANTILE = 0.2
CPU = torch.device("cpu")
PARTS = {"fd": "fd_speedup_", "overhead": "curation_overhead_", "accuracy": "linear_probe_"}   # -> figure prefix
# RGB data gets SimCLR's colour augmentations (strength 0.5 of appendix A's; no-ops on grayscale).
RGB = ["method.saturation=0.4", "method.hue=0.1", "method.grayscale_p=0.2"]


def fd_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance on np.cov statistics (the baseline)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def bench_fd() -> list[Figure]:
    figures = []
    for n, d in SHAPES:
        rng = np.random.default_rng(n + d)
        mix = rng.normal(size=(d, d)) / np.sqrt(d)
        x, y = rng.normal(size=(n, d)) @ mix, rng.normal(size=(n, d)) @ mix * 1.3 + 0.1
        tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()   # features as a net gives them
        ours = float(frechet_distance(tx, ty))
        ref = fd_scipy(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
        slow = d >= 2048
        t_ref = timeit(lambda: fd_scipy(x, y), repeat=1 if slow else 3, warmup=0 if slow else 1)
        t_ours = timeit(lambda: frechet_distance(tx, ty), repeat=5)
        route = "nuclear" if n <= d else "eigh"
        figures.append(Figure(f"fd_speedup_n{n}_d{d}", t_ref / t_ours, "scipy sqrtm (pytorch-fid formula)",
                              {"scipy_s": t_ref, "ours_s": t_ours, "route": route,
                               "rel_diff": abs(ours - ref) / abs(ref)},
                              goal=">= 100x, rel_diff <= 1e-4" if d == 2048 else "rel_diff <= 1e-4"))
        print(figures[-1].line(), flush=True)
    return figures


def make_method(data, *overrides: str, seed: int = 0):
    cfg = load_config("bad_batches", None, [f"train.seed={seed}", *overrides])
    torch.manual_seed(seed)
    method = BadBatches(cfg, data)
    models = method.build_models("train", {})
    opts = method.build_optimizers("train", models)
    return cfg, method, models, opts


def batches_forever(cfg, method):
    """(epoch, batch) pairs, epoch after epoch, in the loop's seeded order."""
    epoch = 0
    while True:
        for batch in memory_batches(cfg, method.train_split("train"), epoch_seed(cfg.train.seed, 0, epoch), 0, 1, CPU):
            yield epoch, batch
        epoch += 1


def bench_overhead(data) -> list[Figure]:
    runs = {"none": ["method.curation=none"],
            "views_vs_originals": ["method.comparison=views_vs_originals", "method.warmup_epochs=0"],
            "view_vs_view": ["method.comparison=view_vs_view", "method.warmup_epochs=0"]}
    state = {}
    for name, ov in runs.items():
        cfg, method, models, opts = make_method(data, *ov)
        ctx = StepContext(stage="train", epoch=0, step=0, device=CPU, rank=0, world_size=1, extra={"schedulers": {}})
        state[name] = (method, models, opts, ctx, batches_forever(cfg, method))
    times = {name: [] for name in runs}
    for rep in range(25):                        # interleaved, so load drifts hit every variant alike
        for name, (method, models, opts, ctx, it) in state.items():
            ctx.epoch, batch = next(it)
            t0 = time.perf_counter()
            method.train_step("train", models, opts, batch, ctx)
            if rep >= 3:                         # warm-up steps excluded
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    return [Figure(f"curation_overhead_{name}", statistics.median(times[name]) / base,
                   "plain SimCLR step (curation=none)",
                   {"step_ms": 1000 * statistics.median(times[name]), "plain_step_ms": 1000 * base,
                    "batch": 64, "extractor": "online", "features": "projection"}, goal="<= 1.10")
            for name in ("views_vs_originals", "view_vs_view")]


def probe_accuracy(data, batch: int, variant: str, seed: int, args) -> dict:
    """One SimCLR run of `args.steps` optimizer steps; variant: uncurated, curated (the default
    detrended window) or curated_raw_window (frd_detrend=none)."""
    ov = [f"train.batch_size={batch}", "method.lr_schedule=constant", PROBE_ARCH, *RGB]
    if variant == "uncurated":
        ov += ["method.curation=none"]
    else:
        ov += ["method.curation=quantile", f"method.frd_quantile={QUANTILE}",
               f"method.warmup_epochs={args.warmup_epochs}",
               f"method.frd_detrend={'none' if variant == 'curated_raw_window' else 'linear'}"]
    cfg, method, models, opts = make_method(data, *ov, seed=seed)
    ctx = StepContext(stage="train", epoch=0, step=0, device=CPU, rank=0, world_size=1, extra={"schedulers": {}})
    drawn = 0
    models["net"].train()
    for ctx.epoch, batch in batches_forever(cfg, method):
        method.train_step("train", models, opts, batch, ctx)
        drawn += 1
        if method.accepted == args.steps:
            break
    m = method.evaluate("train", models, "test", CPU)
    out = {"seed": seed, "test_linear_acc": m["test_linear_acc"], "test_knn_acc": m["test_knn_acc"],
           "batches_drawn": drawn, "optimizer_steps": method.accepted}
    if variant != "uncurated":
        scored, kept = method.curated                 # batches scored after the warm-up, and kept
        out["dropped_fraction"] = 1 - kept / scored if scored else float("nan")
    return out


class Pixels(nn.Module):
    """Raw pixels as the features: the raw-pixel baseline, through the same probe and k-NN as the
    method's encoder (`BadBatches.evaluate`). embed: (B, C, H, W) -> (B, C*H*W)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.embed_dim = math.prod(shape)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def baselines(data, seeds: list[int]) -> dict:
    """raw_pixel: the probe on the pixels (no randomness: measured once, listed per seed);
    random_init: the probe on the encoder at its initialisation, per seed."""
    _, method, _, _ = make_method(data, PROBE_ARCH)
    pixels = method.evaluate("train", {"net": SimpleNamespace(backbone=Pixels(data.info.columns["image"].shape))},
                             "test", CPU)
    out = {"raw_pixel": [{"seed": s, "test_linear_acc": pixels["test_linear_acc"],
                          "test_knn_acc": pixels["test_knn_acc"]} for s in seeds], "random_init": []}
    for s in seeds:
        _, method, models, _ = make_method(data, PROBE_ARCH, seed=s)
        m = method.evaluate("train", models, "test", CPU)
        out["random_init"].append({"seed": s, "test_linear_acc": m["test_linear_acc"],
                                   "test_knn_acc": m["test_knn_acc"]})
    return out


def bench_accuracy(data, args) -> tuple[list[Figure], dict, dict]:
    seeds = list(range(args.seeds))
    base = baselines(data, seeds)
    raw_px, rand = ([r["test_linear_acc"] for r in base[k]] for k in ("raw_pixel", "random_init"))
    print(f"raw-pixel probe {mean_std(raw_px)}, random-init probe {mean_std(rand)}", flush=True)
    figures, raw = [], {}
    for batch in args.batch_sizes:
        plan = [("uncurated", seeds), ("curated", seeds), ("curated_raw_window", seeds[:args.raw_window_seeds])]
        for variant, which in plan:
            raw[f"batch{batch}_{variant}"] = [probe_accuracy(data, batch, variant, s, args) for s in which]
        lin = {v: [r["test_linear_acc"] for r in raw[f"batch{batch}_{v}"]] for v, _ in plan}
        knn = {v: [r["test_knn_acc"] for r in raw[f"batch{batch}_{v}"]] for v, _ in plan}
        dropped = {v: [r["dropped_fraction"] for r in raw[f"batch{batch}_{v}"]] for v, _ in plan[1:]}
        figures.append(Figure(
            f"linear_probe_batch{batch}", statistics.mean(lin["curated"]) / statistics.mean(lin["uncurated"]),
            "uncurated SimCLR, same optimizer steps",
            {"curated": mean_std(lin["curated"]), "uncurated": mean_std(lin["uncurated"]),
             "knn_curated": mean_std(knn["curated"]), "knn_uncurated": mean_std(knn["uncurated"]),
             "raw_pixel": mean_std(raw_px), "random_init": mean_std(rand),
             "optimizer_steps": args.steps, "seeds": len(seeds),
             "curated_batches_drawn": statistics.mean(r["batches_drawn"] for r in raw[f"batch{batch}_curated"])},
            goal="report (paper: curation helps small batches)"))
        figures.append(Figure(
            f"linear_probe_simclr_over_raw_pixel_batch{batch}",
            statistics.mean(lin["uncurated"]) / statistics.mean(raw_px),
            "raw-pixel linear probe", {"uncurated": mean_std(lin["uncurated"]), "raw_pixel": mean_std(raw_px),
                                       "random_init": mean_std(rand)},
            goal="> 1 (the precondition of the curation claim)"))
        if dropped["curated_raw_window"]:
            figures.append(Figure(
                f"linear_probe_dropped_fraction_batch{batch}", statistics.mean(dropped["curated"]) / QUANTILE,
                f"frd_quantile={QUANTILE}", {"detrended": mean_std(dropped["curated"]),
                                              "raw_window": mean_std(dropped["curated_raw_window"]),
                                              "raw_window_linear_acc": mean_std(lin["curated_raw_window"])},
                goal="~1 (the detrended window drops frd_quantile)"))
        for f in figures[-3:]:
            print(f.line(), flush=True)
    return figures, raw, base


def kept_from_previous(parts: list[str]) -> tuple[list[Figure], dict]:
    """The figures (and accuracy runs) of the parts not re-measured, from the previous results."""
    path = RESULTS / "bad_batches.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    figures = [Figure(**f) for f in previous.get("figures", [])
               if any(f["name"].startswith(PARTS[p]) for p in PARTS if p not in parts)]
    measured = previous.get("parts_measured", {p: {"time": previous.get("time"), "dataset": "digits"} for p in PARTS})
    extra = {"parts_measured": {p: measured.get(p) for p in PARTS if p not in parts}}
    if "accuracy" not in parts:
        extra.update({k: previous[k] for k in ("accuracy_runs", "baseline_runs", "dataset", "preconditions", "note")
                      if k in previous})
    return figures, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", help="a built-in dataset or a dataset URI (image, label)")
    ap.add_argument("--parts", default="fd,overhead,accuracy", help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per accuracy run")
    ap.add_argument("--batch-sizes", default="32,128")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="curated runs: epochs that only score")
    ap.add_argument("--raw-window-seeds", type=int, default=1,
                    help="curated runs with frd_detrend=none, per batch size")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(unknown)}; use some of {', '.join(PARTS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = load_config("bad_batches", None, [f"data.dataset={args.dataset}"])
    data = load_bundle(cfg, resolve_dataset(args.dataset, cfg.data.root), ["train", "val", "test"])
    figures, extra = kept_from_previous(parts)
    now = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "dataset": args.dataset}
    if "fd" in parts:
        figures += bench_fd()
    if "overhead" in parts:
        figures += bench_overhead(data)
    if "accuracy" in parts:
        acc_figures, raw, base = bench_accuracy(data, args)
        figures += acc_figures
        # `dataset` and `preconditions` are what bench/quality.py reads: the task, and per-seed
        # baseline accuracies (the claim is testable only where SimCLR beats raw pixels).
        extra.update(accuracy_runs=raw, baseline_runs=base, dataset=args.dataset, preconditions={
            "raw_pixel_probe": [r["test_linear_acc"] for r in base["raw_pixel"]],
            "random_init_probe": [r["test_linear_acc"] for r in base["random_init"]]}, note=(
            f"accuracy runs: reduced budget, in process (1 worker, no Ray), {args.dataset}, ResNet width 8, "
            f"{args.steps} optimizer steps, constant lr, curated = frd_quantile {QUANTILE} (detrended window) "
            f"after {args.warmup_epochs} warm-up epoch(s); {args.seeds} seeds; RGB colour jitter {' '.join(RGB)}"))
    extra["parts_measured"].update({p: now for p in parts})
    write_results("bad_batches", figures, {
        **extra, "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
