"""Learned canonicalization (issue 7): latency and rotated-digits accuracy, in-process (no Ray).

1. Inference latency (median of 7 batches of 256 at 8x8 and 64 at 32x32, random-init weights, 1 intra-op thread)
   at C4 and C8, on 8x8 digits and on 32x32 inputs: the canonicalized model (non-equivariant φ over
   |G| copies + one predictor pass), group averaging (|G| predictor passes) and the equivariant
   group-conv canonicalizer (Kaba et al.), each as a ratio to the plain predictor; and the
   canonicalizer alone, equivariant / non-equivariant (the paper's "up to 2x faster" claim, made
   against large ESCNN canonicalizers — ours is a small group-conv net of the same width and depth;
   it keeps full resolution (stride 1, which keeps rot90 equivariance exact) while φ strides by 2 on
   maps >= 16 px, so at 32x32 most of the gap is resolution, not equivariance).
2. Rotated digits, 3 seeds: a supervised CNN is trained on upright digits (the predictor), then
   every baseline and the method are trained / evaluated with the method's own code (the same
   `Method` hooks the Ray loop calls, run in this process on one worker). Test images are rotated
   by every group element: group_acc and invariance error, mean ± std over seeds.

    .venv/bin/python bench/canonicalization.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Figure, mean_std, timeit, train_stage, write_results  # noqa: E402

from methodlab.config import load_config  # noqa: E402
from methodlab.data import prepare_builtin  # noqa: E402
from methodlab.methods.base import DataBundle  # noqa: E402
from methodlab.models import build_model  # noqa: E402
from methodlab.models.hub import save_pretrained  # noqa: E402
from methodlab.registry import get_method  # noqa: E402
from methodlab.train.core import load_bundle  # noqa: E402

SEEDS = (0, 1, 2)
SUPERVISED_EPOCHS = 10
EPOCHS = 5
BATCH = 128
LATENCY = {8: 256, 32: 64}   # image size -> batch
MODES = {  # name -> overrides
    "plain": ["method.mode=plain"],
    "augment": ["method.mode=augment", "method.finetune_predictor=true"],
    "group_average": ["method.mode=group_average"],
    "equivariant": ["method.mode=equivariant"],
    "canonicalize": ["method.mode=canonicalize"],
}


def train_in_process(name: str, overrides: list[str], data: DataBundle, epochs: int):
    """The method's hooks in the order the shared loop calls them, on one in-process worker."""
    cfg = load_config(name, None, [f"train.epochs={epochs}", f"train.batch_size={BATCH}", *overrides])
    torch.manual_seed(cfg.train.seed)
    method = get_method(name)(cfg, data)
    return method, train_stage(method, "train", {})


def accuracy_study(data: DataBundle, tmp: str) -> tuple[dict, dict]:
    results: dict[str, dict[str, list[float]]] = {}
    timings: dict[str, float] = {}
    for seed in SEEDS:
        t0 = time.perf_counter()
        sup, sup_models = train_in_process("supervised", [f"train.seed={seed}"], data, SUPERVISED_EPOCHS)
        path = os.path.join(tmp, f"supervised-{seed}.pt")
        save_pretrained(*sup.export(sup_models), path)
        timings[f"supervised_seed{seed}_s"] = time.perf_counter() - t0
        for n in (4, 8):
            for mode, overrides in MODES.items():
                t0 = time.perf_counter()
                method, models = train_in_process(
                    "canonicalization", [f"train.seed={seed}", f"method.predictor={path}",
                                         f"method.num_rotations={n}", *overrides], data, EPOCHS)
                metrics = method.evaluate("train", models, "test", torch.device("cpu"))
                key = f"{mode}_c{n}"
                row = results.setdefault(key, {"group_acc": [], "invariance_error": [], "upright_acc": []})
                row["group_acc"].append(metrics["test_group_acc"])
                row["invariance_error"].append(metrics["test_invariance_error"])
                row["upright_acc"].append(metrics["test_acc"])
                timings[f"{key}_seed{seed}_s"] = time.perf_counter() - t0
                print(f"seed {seed} {key:22s} group_acc={metrics['test_group_acc']:.4f} "
                      f"inv_err={metrics['test_invariance_error']:.4f} upright={metrics['test_acc']:.4f} "
                      f"({timings[f'{key}_seed{seed}_s']:.1f}s)", flush=True)
    return results, timings


def latency_study() -> list[Figure]:
    figures = []
    predictor = {"arch": "cnn", "kwargs": {"in_channels": 1, "num_classes": 10}}
    for size, batch in LATENCY.items():
        x = torch.rand(batch, 1, size, size)
        torch.manual_seed(0)
        plain = build_model(predictor).eval()
        with torch.no_grad():
            t_plain = timeit(lambda: plain(x), repeat=7, warmup=1)
        for n in (4, 8):
            models = {
                "canonicalized": build_model({"arch": "canonicalized", "kwargs": dict(
                    predictor=predictor, in_channels=1, image_size=size, num_rotations=n)}),
                "equivariant": build_model({"arch": "canonicalized", "kwargs": dict(
                    predictor=predictor, in_channels=1, image_size=size, num_rotations=n,
                    canonicalizer="group_conv")}),
                "group_average": build_model({"arch": "group_averaged", "kwargs": dict(
                    predictor=predictor, num_rotations=n)}),
            }
            t = {}
            with torch.no_grad():
                for name, model in models.items():
                    model.eval()
                    t[name] = timeit(lambda: model(x), repeat=7, warmup=1)
                t_canon = {name: timeit(lambda: models[name].canonicalize(x), repeat=7, warmup=1)
                           for name in ("canonicalized", "equivariant")}
            for name, secs in t.items():
                figures.append(Figure(f"latency_{name}_c{n}_{size}px", secs / t_plain, "plain predictor",
                                      {"ms_per_batch": secs * 1e3, "plain_ms": t_plain * 1e3, "batch": batch}))
                print(figures[-1].line(), flush=True)
            figures.append(Figure(
                f"canonicalizer_speedup_c{n}_{size}px", t_canon["equivariant"] / t_canon["canonicalized"],
                "non-equivariant canonicalizer (ratio = equivariant time / ours; >1: ours faster)",
                {"ours_ms": t_canon["canonicalized"] * 1e3, "equivariant_ms": t_canon["equivariant"] * 1e3},
                goal="up to 2x (paper, vs ESCNN canonicalizers)"))
            print(figures[-1].line(), flush=True)
    return figures


def main() -> None:
    torch.set_num_threads(1)   # a shared 2-core box: intra-op threads only add contention
    t_start = time.perf_counter()
    figures = latency_study()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("canonicalization", None, [f"data.root={tmp}/data"])
        data = load_bundle(cfg, prepare_builtin("digits", cfg.data.root), ["train", "val", "test"])
        results, timings = accuracy_study(data, tmp)
    for key, row in results.items():
        figures.append(Figure(
            f"group_acc_{key}", statistics.mean(row["group_acc"]), "score: mean test accuracy over group elements",
            {"group_acc": mean_std(row["group_acc"]), "invariance_error": mean_std(row["invariance_error"]),
             "upright_acc": mean_std(row["upright_acc"])}))
    write_results("canonicalization", figures, {
        "setup": {"seeds": list(SEEDS), "supervised_epochs": SUPERVISED_EPOCHS, "epochs": EPOCHS,
                  "in_process": "one process, no Ray: the Method hooks the shared loop calls",
                  "torch_threads": 1, "latency_batch": {f"{k}px": v for k, v in LATENCY.items()},
                  "batch_size": BATCH, "predictor": "supervised CNN trained on upright digits",
                  "frozen_predictor": "all modes except augment"},
        "accuracy": {k: {m: v for m, v in row.items()} for k, row in results.items()},
        "timings_s": timings, "total_s": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
