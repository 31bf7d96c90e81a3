"""MMANet: accuracy per modality combination and its mean, over 5 seeds, of
  (a) the teacher on complete data (and, for reference, on each combination with the missing
      modalities' features zeroed),
  (b) plain modality-dropout training (the deployment network, lambda_mad = lambda_mar = 0),
  (c) + MAD (lambda_mar = 0),
  (d) + MAR (lambda_mad = 0),
  (e) full MMANet (defaults: lambda_mad = 30, lambda_mar = 0.5),
on `--dataset` (default the method's, digits_multimodal). Also recorded:
  * the precondition "missing modalities hurt": the dropout baseline's test accuracy with every
    modality minus its accuracy with the worst single modality, per seed (MAD and MAR can only
    matter where dropping modalities costs accuracy);
  * which weak set each mining distance picks per seed, against the expected one: the one the
    dataset declares (`methods.mmanet.declared_weak_set`: shapes_multimodal, synthetic_multimodal),
    else the combination missing one modality that the dropout baseline scores lowest (mean over
    seeds), with its sub-combinations (a proxy: on digits_multimodal the pairs differ by < 1 std).
Everything runs in this process with the method's own hooks (build_models, on_epoch_start,
train_step, evaluate) and the platform's data order, on one worker and without Ray: the figures are
about the method, not the platform. The teacher of a seed is trained once and shared by (b)-(e).
Ratios are mean test accuracy over all combinations against (b), measured in this same process.
The final epoch is scored (no best-checkpoint selection).

A variant that bench/tune.py swept on this task (a `methodlab sweep` of its train.lr on val,
ASHA, in MLflow; bench/results/tuned.json) trains with what its sweep chose, its teacher too (a
sweep's trial trains both stages at its lr): the teacher is then shared by the variants whose lr
is the same. The teacher row is the one at the bench's own lr; `--untuned` ignores the sweeps.

    .venv/bin/python bench/mmanet.py [--dataset shapes_multimodal] [--seeds 5] [--name mmanet] \
        [--set method.width=8 ...]
    .venv/bin/python bench/mmanet.py --dataset shapes_multimodal --name mmanet_shapes \
        --set method.width=4 --set method.teacher_epochs=4 --set train.epochs=9   # as bench/tune.py sweeps it
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))

import torch  # noqa: E402

from common import Figure, mean_std, train_stage, tuned, tuned_by, tuned_overrides, variant_key, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.mmanet import MMANet, declared_weak_set, mine_weak_set  # noqa: E402
from methodlab.train.core import load_bundle, seed_everything  # noqa: E402

# Shorter than the method's defaults (teacher 10, student 20 epochs of batch 64) so that 5 seeds x
# 5 models fit in 10 minutes on a shared 2-core CPU. begin_epoch and the mining window keep their
# official defaults (mining after epochs 2-4, MAD and MAR from epoch 5 on: 5 epochs of them).
# The final epoch is scored, so the loop evaluates at stage ends only (eval_every beyond the epochs).
BENCH = ["method.teacher_epochs=5", "train.epochs=10", "train.batch_size=128", "train.eval_every=1000"]
VARIANTS = {
    "dropout": ["method.lambda_mad=0", "method.lambda_mar=0"],
    "dropout+MAD": ["method.lambda_mar=0"],
    "dropout+MAR": ["method.lambda_mad=0"],
    "MMANet": [],
}
MINING = ("histogram_kl", "accuracy_gap")


def teacher_per_combination(method: MMANet, teacher) -> list[float]:
    labels = method.data.splits["test"].tensors["label"]
    return [(method.predict(teacher, "test", mask, torch.device("cpu")) == labels).double().mean().item()
            for mask in method.masks]


def weak_set_name(method: MMANet, weak: list[int]) -> str:
    return ",".join(method.names[i] for i in weak)


def mined_with(data, overrides: list[str]) -> str:
    """The weak set a task-only student run picks (stopped once it is fixed, at begin_epoch)."""
    begin = load_config("mmanet", None, overrides).method.begin_epoch
    cfg = load_config("mmanet", None, [*overrides, "method.lambda_mad=0", "method.lambda_mar=0",
                                       f"train.epochs={begin + 1}"])
    method = MMANet(cfg, data)
    train_stage(method, "student", method.build_models("teacher", {}))
    return weak_set_name(method, method.weak)


def expected_weak_set(method: MMANet, meta: dict, dropout_mean: list[float]) -> tuple[str, str]:
    """(weak set, how it was derived)."""
    declared = declared_weak_set(meta, method.masks)
    if declared is not None:
        return weak_set_name(method, declared), "declared by the dataset (meta.weakest_combination or informativeness)"
    _, weak = mine_weak_set(-torch.tensor(dropout_mean), method.masks)
    return weak_set_name(method, weak), "lowest dropout-baseline test accuracy among combinations missing one modality"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=MMANet.default_dataset)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--name", default="mmanet", help="bench/results/<name>.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the bench's own (repeatable)")
    parser.add_argument("--untuned", action="store_true",
                        help="ignore bench/results/tuned.json (bench/tune.py's sweeps): every variant at the bench's lr")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    torch.set_num_threads(1)   # tiny tensors: intra-op threads only add contention on a small CPU box
    t_start = time.perf_counter()
    bench = [f"data.dataset={args.dataset}", *BENCH, *args.set]
    base = load_config("mmanet", None, bench)
    info = resolve_dataset(args.dataset, base.data.root)
    results: dict[str, list[list[float]]] = {"teacher": [], **{v: [] for v in VARIANTS}}
    mined: dict[str, list[str]] = {mode: [] for mode in MINING}
    swept = {} if args.untuned else {v: tuned("mmanet").get(variant_key(v, args.dataset)) for v in VARIANTS}
    names: list[str] = []
    method = None
    for seed in seeds:
        cfg = load_config("mmanet", None, [*bench, f"train.seed={seed}"])
        data = load_bundle(cfg, info, ["train", "val", "test"])
        teachers: dict[tuple, dict] = {}

        def teacher_at(chosen: list[str]) -> tuple[MMANet, dict]:
            """The seed's teacher trained with `chosen` (a variant's tuned lr), once per choice."""
            if tuple(chosen) not in teachers:
                seed_everything(seed)
                m = MMANet(load_config("mmanet", None, [*bench, f"train.seed={seed}", *chosen]), data)
                teachers[tuple(chosen)] = (m, train_stage(m, "teacher", {}))
            return teachers[tuple(chosen)]

        method, teacher = teacher_at([])
        names = method.names
        results["teacher"].append(teacher_per_combination(method, teacher["teacher"]))
        for variant, overrides in VARIANTS.items():
            chosen = tuned_overrides(swept.get(variant))
            vcfg = load_config("mmanet", None, [*bench, f"train.seed={seed}", *overrides, *chosen])
            vmethod = MMANet(vcfg, data)
            seed_everything(seed)
            models = train_stage(vmethod, "student", {"teacher": copy.deepcopy(teacher_at(chosen)[1]["teacher"])})
            test = vmethod.evaluate("student", models, "test", torch.device("cpu"))
            results[variant].append([test[f"test_acc_{n}"] for n in names])
            if variant == "MMANet":   # the default mining distance: the full method's own pick
                mined[vcfg.method.mining_distance].append(weak_set_name(vmethod, vmethod.weak))
            print(f"seed {seed} {variant:12s} test_mean_acc={test['test_mean_acc']:.4f} "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)
        for mode in MINING:
            if mode != base.method.mining_distance:
                seed_everything(seed)
                mined[mode].append(mined_with(data, [*bench, f"train.seed={seed}", f"method.mining_distance={mode}"]))
        print(f"seed {seed} mined " + " ".join(f"{m}={v[-1]}" for m, v in mined.items()), flush=True)

    def mean_of(variant):
        return [statistics.mean(row) for row in results[variant]]

    singles = [i for i, m in enumerate(method.masks) if m.sum() == 1]
    hurt = [row[-1] - min(row[i] for i in singles) for row in results["dropout"]]
    dropout_mean = [statistics.mean(r[i] for r in results["dropout"]) for i in range(len(names))]
    expected, derived = expected_weak_set(method, info.meta, dropout_mean)
    mining = {mode: {"picked": picks, "expected": expected, "hits": sum(p == expected for p in picks),
                     "seeds": len(picks)} for mode, picks in mined.items()}

    baseline = statistics.mean(mean_of("dropout"))
    figures = [Figure("teacher_complete_test_acc", ratio=statistics.mean(r[-1] for r in results["teacher"]),
                      baseline="score (teacher on complete data)",
                      detail={"acc": mean_std([r[-1] for r in results["teacher"]]),
                              "mean_acc_over_combinations_zero_filled": mean_std(mean_of("teacher"))}),
               Figure("precondition_missing_modalities_hurt", ratio=statistics.mean(hurt),
                      baseline="score (dropout baseline: all-modality minus worst single-modality test acc)",
                      detail={"per_seed": mean_std(hurt)})]
    for variant in VARIANTS:
        detail = {"mean_acc": mean_std(mean_of(variant))}
        detail.update({f"acc_{n}": mean_std([r[i] for r in results[variant]]) for i, n in enumerate(names)})
        # MLflow metric names take no '+'.
        figures.append(Figure(f"{variant.replace('+', '_plus_')}_test_mean_acc",
                              ratio=statistics.mean(mean_of(variant)) / baseline,
                              baseline="plain modality dropout (same process)", detail=detail))
    for mode, m in mining.items():
        figures.append(Figure(f"mining_{mode}_hits", ratio=m["hits"] / m["seeds"],
                              baseline=f"score (seeds whose weak set is {expected})",
                              detail={"picked": ";".join(m["picked"])}))
    write_results(args.name, figures, {
        "dataset": args.dataset, "seeds": seeds, "combinations": names,
        "overrides": bench, "config": base.method.model_dump(),
        "train": {"epochs": base.train.epochs, "lr": base.train.lr, "batch_size": base.train.batch_size},
        "per_seed_test_acc": results,
        "tuned": {v: tuned_by(swept.get(v)) if swept.get(v) else f"not swept: the bench's train.lr={base.train.lr:g}"
                  for v in VARIANTS},
        "preconditions": {"claim": "missing modalities hurt", "missing_modalities_hurt": hurt,
                          "definition": "dropout baseline: test acc with all modalities minus the worst "
                                        "single modality's, per seed"},
        "mining": mining, "expected_weak_set_from": derived,
        "mined_weak_sets": mined[base.method.mining_distance],
        "setup": "in-process, 1 worker, no Ray; final epoch scored; CPU",
        "wall_seconds": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
