"""MMANet on digits_multimodal: accuracy per modality combination and its mean, over 3 seeds, of
  (a) the teacher on complete data (and, for reference, on each combination with the missing
      modalities' features zeroed),
  (b) plain modality-dropout training (the deployment network, lambda_mad = lambda_mar = 0),
  (c) + MAD (lambda_mar = 0),
  (d) + MAR (lambda_mad = 0),
  (e) full MMANet (defaults: lambda_mad = 30, lambda_mar = 0.5).
Everything runs in this process with the method's own hooks (build_models, on_epoch_start,
train_step, evaluate) and the platform's data order, on one worker and without Ray: the figures are
about the method, not the platform. The teacher of a seed is trained once and shared by (b)-(e).
Ratios are mean test accuracy over all combinations against (b), measured in this same process.
The final epoch is scored (no best-checkpoint selection).

    .venv/bin/python bench/mmanet.py
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))

import torch  # noqa: E402

from common import Figure, mean_std, train_stage, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.mmanet import MMANet  # noqa: E402
from methodlab.train.core import load_bundle, seed_everything  # noqa: E402

SEEDS = (0, 1, 2)
# Shorter than the method's defaults (teacher 10, student 20 epochs of batch 64) so that 3 seeds x
# 5 models fit in a few minutes on a shared 2-core CPU; MAD and MAR are still on for 12 epochs.
BENCH = ["method.teacher_epochs=8", "train.epochs=16", "train.batch_size=128", "method.begin_epoch=4"]
VARIANTS = {
    "dropout": ["method.lambda_mad=0", "method.lambda_mar=0"],
    "dropout+MAD": ["method.lambda_mar=0"],
    "dropout+MAR": ["method.lambda_mad=0"],
    "MMANet": [],
}


def teacher_per_combination(method: MMANet, teacher) -> list[float]:
    labels = method.data.splits["test"].tensors["label"]
    return [(method.predict(teacher, "test", mask, torch.device("cpu")) == labels).double().mean().item()
            for mask in method.masks]


def main() -> None:
    torch.set_num_threads(1)   # tiny tensors: intra-op threads only add contention on a small CPU box
    t_start = time.perf_counter()
    base = load_config("mmanet", None, BENCH)
    info = resolve_dataset(MMANet.default_dataset, base.data.root)
    results: dict[str, list[list[float]]] = {"teacher": [], **{v: [] for v in VARIANTS}}
    weak_sets: list[str] = []
    names: list[str] = []
    for seed in SEEDS:
        cfg = load_config("mmanet", None, [*BENCH, f"train.seed={seed}"])
        data = load_bundle(cfg, info, ["train", "val", "test"])
        seed_everything(seed)
        method = MMANet(cfg, data)
        names = method.names
        teacher = train_stage(method, "teacher", {})
        results["teacher"].append(teacher_per_combination(method, teacher["teacher"]))
        for variant, overrides in VARIANTS.items():
            vcfg = load_config("mmanet", None, [*BENCH, f"train.seed={seed}", *overrides])
            vmethod = MMANet(vcfg, data)
            seed_everything(seed)
            models = train_stage(vmethod, "student", {"teacher": copy.deepcopy(teacher["teacher"])})
            test = vmethod.evaluate("student", models, "test", torch.device("cpu"))
            results[variant].append([test[f"test_acc_{n}"] for n in names])
            if variant == "MMANet":
                weak_sets.append(",".join(vmethod.names[i] for i in vmethod.weak))
            print(f"seed {seed} {variant:12s} test_mean_acc={test['test_mean_acc']:.4f} "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)

    def mean_of(variant):
        return [statistics.mean(row) for row in results[variant]]

    baseline = statistics.mean(mean_of("dropout"))
    figures = [Figure("teacher_complete_test_acc", ratio=statistics.mean(r[-1] for r in results["teacher"]),
                      baseline="score (teacher on complete data)",
                      detail={"acc": mean_std([r[-1] for r in results["teacher"]]),
                              "mean_acc_over_combinations_zero_filled": mean_std(mean_of("teacher"))})]
    for variant in VARIANTS:
        detail = {"mean_acc": mean_std(mean_of(variant))}
        detail.update({f"acc_{n}": mean_std([r[i] for r in results[variant]]) for i, n in enumerate(names)})
        figures.append(Figure(f"{variant}_test_mean_acc", ratio=statistics.mean(mean_of(variant)) / baseline,
                              baseline="plain modality dropout (same process)", detail=detail))
    write_results("mmanet", figures, {
        "dataset": "digits_multimodal", "seeds": list(SEEDS), "combinations": names,
        "overrides": BENCH, "config": base.method.model_dump(),
        "train": {"epochs": base.train.epochs, "lr": base.train.lr, "batch_size": base.train.batch_size},
        "per_seed_test_acc": results, "mined_weak_sets": weak_sets,
        "setup": "in-process, 1 worker, no Ray; final epoch scored; CPU",
        "wall_seconds": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
