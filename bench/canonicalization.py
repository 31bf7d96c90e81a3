"""Learned canonicalization (issues 7, 19): latency and rotated-image accuracy, in-process (no Ray).

1. Inference latency (median of 7 batches of 256 at 8x8 and 64 at 32x32, random-init weights, 1 intra-op thread)
   at C4 and C8, at the dataset's channel count: the canonicalized model (non-equivariant φ over
   |G| copies + one predictor pass), group averaging (|G| predictor passes) and the equivariant
   steerable group-conv canonicalizer (Kaba et al.), each as a ratio to the plain predictor; and the
   canonicalizer alone, equivariant / non-equivariant (the paper's "up to 2x faster" claim, made
   against large ESCNN canonicalizers — ours is a small group-conv net of the same width and depth).
2. Rotated images, `--seeds` seeds (default 5): a supervised CNN is trained on upright images (the
   predictor), then every baseline and the method are trained / evaluated with the method's own code
   (the same `Method` hooks the Ray loop calls, run in this process on one worker). Test images are
   rotated by every group element: per-seed group_acc, invariance error and upright accuracy.
   The precondition (the plain model fails on rotated copies) is recorded per seed: the plain
   model's upright accuracy and its accuracy averaged over the non-identity elements.
3. The two gradient paths (`method.gradient_path`): per seed and group, the cosine between the
   task-loss gradients they give φ at init (same weights, same batch), and with `--angle-path` the
   method trained with gradient_path=angle as an extra variant `canonicalize_angle_cN`.

    .venv/bin/python bench/canonicalization.py                                   # digits, 5 seeds
    .venv/bin/python bench/canonicalization.py --dataset shapes_upright --angle-path
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Figure, mean_std, timeit, train_stage, tuned, tuned_by, tuned_overrides, write_results  # noqa: E402

from methodlab.config import load_config  # noqa: E402
from methodlab.data import prepare_builtin  # noqa: E402
from methodlab.methods.base import DataBundle  # noqa: E402
from methodlab.metrics.group import group_accuracy_from_counts  # noqa: E402
from methodlab.models import build_model  # noqa: E402
from methodlab.models.canonicalizer import element_names  # noqa: E402
from methodlab.models.hub import save_pretrained  # noqa: E402
from methodlab.registry import get_method  # noqa: E402
from methodlab.train.core import load_bundle  # noqa: E402

BATCH = 128
LATENCY = {8: 256, 32: 64}   # image size -> batch
MODES = {  # name -> overrides
    "plain": ["method.mode=plain"],
    "augment": ["method.mode=augment", "method.finetune_predictor=true"],
    "group_average": ["method.mode=group_average"],
    "equivariant": ["method.mode=equivariant"],
    "canonicalize": ["method.mode=canonicalize"],
}
ANGLE_PATH = {"canonicalize_angle": ["method.mode=canonicalize", "method.gradient_path=angle"]}


def make_method(name: str, overrides: list[str], data: DataBundle, epochs: int = 1):
    # validation once, at the end: per-epoch evaluations under every group element cost more than
    # the training at 32 px (|G|^2 passes of φ per image), and the benchmark reads only the test split
    cfg = load_config(name, None, [f"train.epochs={epochs}", f"train.batch_size={BATCH}",
                                   f"train.eval_every={epochs}", *overrides])
    torch.manual_seed(cfg.train.seed)
    return get_method(name)(cfg, data)


def train_in_process(name: str, overrides: list[str], data: DataBundle, epochs: int):
    """The method's hooks in the order the shared loop calls them, on one in-process worker. A
    variant with nothing to train (a frozen plain or group-average baseline) is only built: its
    epochs would be forward passes that change nothing."""
    method = make_method(name, overrides, data, epochs)
    models = method.build_models("train", {})
    if not method.build_optimizers("train", models):
        return method, models
    return method, train_stage(method, "train", {})


def test_metrics(method, models, num_rotations: int) -> dict[str, float]:
    """The test metrics of a variant: those of the loop's own final test evaluation where it ran
    (`Canonicalization.evaluate` keeps its counts; evaluating again would double the dominant cost),
    else (a variant with nothing to train) one evaluation here."""
    if method.test_counts is None:
        return method.evaluate("train", models, "test", torch.device("cpu"))
    return group_accuracy_from_counts(method.test_counts, element_names(num_rotations, False), "test")


def gradient_cosine(method, models, batch) -> float:
    """Cosine between the task-loss gradients into φ of gradient_path=copies and =angle, at the same
    weights and batch, in eval mode (dropout and batch statistics would differ between passes)."""
    model = models["model"].model.eval()
    grads = []
    for path in ("copies", "angle"):
        model.gradient_path = path
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model.predictor(model.canonicalize(batch["image"])["image"]), batch["label"]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.phi.parameters() if p.grad is not None]))
    model.gradient_path = method.mcfg.gradient_path
    model.zero_grad(set_to_none=True)
    return float(F.cosine_similarity(grads[0], grads[1], dim=0))


def accuracy_study(data: DataBundle, tmp: str, args, chosen: dict) -> tuple[dict, dict, dict]:
    """`chosen`: bench/tune.py's choices per variant key ({} with --untuned)."""
    results: dict[str, dict[str, list[float]]] = {}
    precondition: dict[str, dict[str, list[float]]] = {}
    timings: dict[str, float] = {}
    modes = {**MODES, **(ANGLE_PATH if args.angle_path else {})}
    if args.modes:
        modes = {k: v for k, v in modes.items() if k in args.modes}
    if args.equivariant_channels and "equivariant" in modes:   # the C_n network is |G| times wider than φ per channel: budget
        modes["equivariant"] = [*modes["equivariant"], f"method.channels={args.equivariant_channels}"]
    common = [f"data.dataset={args.dataset}", *args.override]
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        sup, sup_models = train_in_process("supervised", [f"train.seed={seed}", *common], data,
                                           args.supervised_epochs)
        path = os.path.join(tmp, f"supervised-{seed}.pt")
        save_pretrained(*sup.export(sup_models), path)
        timings[f"supervised_seed{seed}_s"] = time.perf_counter() - t0
        for n in args.groups:
            for mode, overrides in modes.items():
                t0 = time.perf_counter()
                key = f"{mode}_c{n}"
                # the learning rate bench/tune.py's sweep chose for this variant (same budget for all)
                overrides = [*overrides, *tuned_overrides(chosen.get(key))]
                method, models = train_in_process(
                    "canonicalization", [f"train.seed={seed}", f"method.predictor={path}",
                                         f"method.num_rotations={n}", *common, *overrides], data, args.epochs)
                metrics = test_metrics(method, models, n)
                row = results.setdefault(key, {"group_acc": [], "invariance_error": [], "upright_acc": []})
                row["group_acc"].append(metrics["test_group_acc"])
                row["invariance_error"].append(metrics["test_invariance_error"])
                row["upright_acc"].append(metrics["test_acc"])
                if mode == "plain":   # the precondition: upright accuracy vs accuracy on rotated copies
                    rotated = [v for k, v in metrics.items() if k.startswith("test_acc_") and k != "test_acc_r0"]
                    pre = precondition.setdefault(f"c{n}", {"plain_upright_acc": [], "plain_rotated_acc": []})
                    pre["plain_upright_acc"].append(metrics["test_acc"])
                    pre["plain_rotated_acc"].append(statistics.mean(rotated))
                if mode == "canonicalize":
                    init = make_method("canonicalization", [f"train.seed={seed}", f"method.predictor={path}",
                                                            f"method.num_rotations={n}", *common, *overrides], data)
                    cos = gradient_cosine(init, init.build_models("train", {}), data.splits["train"].head(BATCH))
                    precondition.setdefault("gradient_path_cosine_at_init", {}).setdefault(f"c{n}", []).append(cos)
                timings[f"{key}_seed{seed}_s"] = time.perf_counter() - t0
                print(f"seed {seed} {key:22s} group_acc={metrics['test_group_acc']:.4f} "
                      f"inv_err={metrics['test_invariance_error']:.4f} upright={metrics['test_acc']:.4f} "
                      f"({timings[f'{key}_seed{seed}_s']:.1f}s)", flush=True)
    return results, precondition, timings


def latency_study(channels: int) -> list[Figure]:
    figures = []
    predictor = {"arch": "cnn", "kwargs": {"in_channels": channels, "num_classes": 10}}
    for size, batch in LATENCY.items():
        x = torch.rand(batch, channels, size, size)
        torch.manual_seed(0)
        plain = build_model(predictor).eval()
        with torch.no_grad():
            t_plain = timeit(lambda: plain(x), repeat=7, warmup=1)
        for n in (4, 8):
            models = {
                "canonicalized": build_model({"arch": "canonicalized", "kwargs": dict(
                    predictor=predictor, in_channels=channels, image_size=size, num_rotations=n)}),
                "equivariant": build_model({"arch": "canonicalized", "kwargs": dict(
                    predictor=predictor, in_channels=channels, image_size=size, num_rotations=n,
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", help="a built-in image dataset (shapes_upright: 32 px RGB)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5, help="canonicalization epochs per variant")
    p.add_argument("--supervised-epochs", type=int, default=10, help="epochs of the upright predictor")
    p.add_argument("--groups", type=int, nargs="+", default=[4, 8], help="num_rotations to run")
    p.add_argument("--angle-path", action="store_true", help="also train canonicalize with gradient_path=angle")
    p.add_argument("--modes", nargs="+", choices=[*MODES, *ANGLE_PATH], default=None,
                   help="only these variants (default: all)")
    p.add_argument("--equivariant-channels", type=int, default=None,
                   help="channels of the equivariant baseline (default: method.channels, as φ)")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--untuned", action="store_true",
                   help="ignore bench/results/tuned.json (bench/tune.py's sweeps): every variant at the defaults")
    p.add_argument("--out", default="canonicalization", help="bench/results/<out>.json")
    p.add_argument("override", nargs="*", help="key=value overrides for every run (e.g. data.limit_rows=1000)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)   # a shared 2-core box: intra-op threads only add contention
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("canonicalization", None, [f"data.root={tmp}/data", f"data.dataset={args.dataset}",
                                                     *args.override])
        data = load_bundle(cfg, prepare_builtin(args.dataset, cfg.data.root), ["train", "val", "test"])
        channels = data.info.columns["image"].shape[0]
        figures = [] if args.no_latency else latency_study(channels)
        chosen = {} if args.untuned else tuned("canonicalization")   # bench/tune.py's sweeps
        results, precondition, timings = accuracy_study(data, tmp, args, chosen)
    for key, row in results.items():
        figures.append(Figure(
            f"group_acc_{key}", statistics.mean(row["group_acc"]), "score: mean test accuracy over group elements",
            {"group_acc": mean_std(row["group_acc"]), "invariance_error": mean_std(row["invariance_error"]),
             "upright_acc": mean_std(row["upright_acc"])}))
    for g, pre in precondition.items():
        if g.startswith("c"):
            figures.append(Figure(
                f"precondition_plain_rotated_drop_{g}",
                statistics.mean(pre["plain_upright_acc"]) - statistics.mean(pre["plain_rotated_acc"]),
                "precondition: plain upright accuracy minus its accuracy on rotated copies (> 0: it fails rotated)",
                {k: mean_std(v) for k, v in pre.items()}))
    for g, cos in precondition.get("gradient_path_cosine_at_init", {}).items():
        figures.append(Figure(f"gradient_path_cosine_{g}", statistics.mean(cos),
                              "cosine of the copies- and angle-path gradients into φ at init", {"cosine": mean_std(cos)}))
    write_results(args.out, figures, {
        "setup": {"dataset": args.dataset, "seeds": list(range(args.seeds)), "supervised_epochs": args.supervised_epochs,
                  "epochs": args.epochs, "groups": args.groups, "overrides": args.override, "modes": args.modes or "all",
                  "equivariant_channels": args.equivariant_channels or "method.channels",
                  "in_process": "one process, no Ray: the Method hooks the shared loop calls",
                  "torch_threads": 1, "latency_batch": {f"{k}px": v for k, v in LATENCY.items()},
                  "batch_size": BATCH, "predictor": f"supervised CNN trained on upright {args.dataset}",
                  "frozen_predictor": "all modes except augment", "command": " ".join(sys.argv)},
        "accuracy": {k: {m: v for m, v in row.items()} for k, row in results.items()},
        "tuned": {k: tuned_by(chosen.get(k)) for k in results},
        "precondition": precondition,
        "timings_s": timings, "total_s": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
