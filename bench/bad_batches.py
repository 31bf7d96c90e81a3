"""Bad Batches, three measurements, each against a baseline measured in this same process:

  1. Fréchet distance: `methodlab.metrics.frechet` (torch, float64) vs the reference formula with
     `scipy.linalg.sqrtm` (pytorch-fid's `calculate_frechet_distance`, covariances included), at
     n in {64, 256, 512} and d in {128, 512, 2048}; speed-up and relative difference of the values.
     Goal: >= 100x at d=2048 with equal values.
  2. Curation overhead: median step time of bad_batches with FRD scoring (online extractor, both
     comparison modes) over plain SimCLR (`curation=none`), steps interleaved. Goal: <= 1.10.
  3. Linear-probe test accuracy of curated (frd_quantile=0.2 after 1 warm-up epoch) vs uncurated
     SimCLR on digits at batch 32 and 128, 3 seeds, the SAME number of optimizer steps (a curated
     run draws batches until it has taken as many steps). Reduced budget to fit the time limit:
     in process (one worker, no Ray), STEPS optimizer steps, a ResNet of width 8 (the default is 16).

One thread throughout (torch and scipy's BLAS), as a Ray worker with one CPU gets (OMP_NUM_THREADS=1).

    .venv/bin/python bench/bad_batches.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))
# One BLAS/OpenMP thread for scipy as for torch (set before numpy loads): on a shared 2-core machine
# two spinning BLAS threads made scipy's sqrtm ~10x slower, which would inflate the speed-up.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from common import Figure, mean_std, timeit, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.bad_batches import BadBatches  # noqa: E402
from methodlab.methods.base import StepContext  # noqa: E402
from methodlab.metrics.frechet import frechet_distance  # noqa: E402
from methodlab.train.core import epoch_seed, load_bundle, memory_batches  # noqa: E402

SHAPES = [(n, d) for d in (128, 512, 2048) for n in (64, 256, 512)]
STEPS = 100                    # optimizer steps per accuracy run
PROBE_ARCH = "method.arch_kwargs={width: 8, blocks: [1, 1, 1]}"
SEEDS = (0, 1, 2)
CPU = torch.device("cpu")


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


def probe_accuracy(data, batch: int, curated: bool, seed: int) -> tuple[float, float, int]:
    ov = [f"train.batch_size={batch}", "method.lr_schedule=constant", PROBE_ARCH]
    ov += ["method.curation=quantile", "method.frd_quantile=0.2", "method.warmup_epochs=1"] if curated \
        else ["method.curation=none"]
    cfg, method, models, opts = make_method(data, *ov, seed=seed)
    ctx = StepContext(stage="train", epoch=0, step=0, device=CPU, rank=0, world_size=1, extra={"schedulers": {}})
    drawn = 0
    models["net"].train()
    for ctx.epoch, batch in batches_forever(cfg, method):
        method.train_step("train", models, opts, batch, ctx)
        drawn += 1
        if method.accepted == STEPS:
            break
    m = method.evaluate("train", models, "test", CPU)
    return m["test_linear_acc"], m["test_knn_acc"], drawn


def bench_accuracy(data) -> tuple[list[Figure], dict]:
    figures, raw = [], {}
    for batch in (32, 128):
        acc = {}
        for curated in (False, True):
            runs = [probe_accuracy(data, batch, curated, s) for s in SEEDS]
            acc[curated] = runs
            raw[f"batch{batch}_{'curated' if curated else 'uncurated'}"] = [
                {"seed": s, "test_linear_acc": a, "test_knn_acc": k, "batches_drawn": n}
                for s, (a, k, n) in zip(SEEDS, runs)]
        lin = {c: [r[0] for r in acc[c]] for c in acc}
        knn = {c: [r[1] for r in acc[c]] for c in acc}
        figures.append(Figure(
            f"linear_probe_batch{batch}", statistics.mean(lin[True]) / statistics.mean(lin[False]),
            "uncurated SimCLR, same optimizer steps",
            {"curated": mean_std(lin[True]), "uncurated": mean_std(lin[False]),
             "knn_curated": mean_std(knn[True]), "knn_uncurated": mean_std(knn[False]),
             "optimizer_steps": STEPS, "seeds": len(SEEDS),
             "curated_batches_drawn": statistics.mean(r[2] for r in acc[True])},
            goal="report (paper: curation helps small batches)"))
        print(figures[-1].line(), flush=True)
    return figures, raw


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = load_config("bad_batches")
    data = load_bundle(cfg, resolve_dataset("digits", cfg.data.root), ["train", "val", "test"])
    figures = bench_fd()
    figures += bench_overhead(data)
    acc_figures, raw = bench_accuracy(data)
    figures += acc_figures
    write_results("bad_batches", figures, {
        "note": "accuracy runs: reduced budget, in process (1 worker, no Ray), digits, ResNet width 8, "
                f"{STEPS} optimizer steps, constant lr, curated = frd_quantile 0.2 after 1 warm-up epoch",
        "accuracy_runs": raw, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
