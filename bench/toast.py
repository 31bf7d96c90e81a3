"""TOAST benchmark: trainable-parameter fraction per mode, step time of TOAST vs full fine-tuning,
and target test accuracy of linear / finetune / toast / toast-lite on a transfer task over seeds.

The backbone is a small ViT pretrained here with the supervised method on `--source` (default
digits_source, digits 0-4); the transfer runs on `--dataset` (default digits_transfer: digits 5-9,
10 labelled images per class, whose `source_train` table is what TOAST pretunes on). A mode that
bench/tune.py swept on this task (a `methodlab sweep` of its lr on val, ASHA, in MLflow; see
bench/results/tuned.json) trains every seed with what its sweep chose; any other mode gets its
learning rate (and optimizer, with several `--optimizers`; `sgd` is the official SGD + momentum
0.9) chosen on the target val split per seed from `--lrs` (default 1e-3, 1e-2, 1e-1).

Precondition "the backbone transfers at all": the linear probe on the pretrained backbone against
the same probe on a random-init backbone of the same architecture (method.backbone=scratch), each
with its learning rate chosen on val. Where the pretrained probe is not above the random one,
pretuning and steering have nothing to transfer and the accuracy comparison says nothing.

Runs in-process on one worker, without Ray (so it fits the time budget on a 2-core CPU): the
method's own hooks (build_models, build_optimizers, build_schedulers, train_step, evaluate) are
driven by a minimal single-worker loop over the platform's seeded batches.

    .venv/bin/python bench/toast.py                                   # digits, 3 seeds
    .venv/bin/python bench/toast.py --source shapes_source --dataset shapes_transfer --patch-size 8 \
        --seeds 5 --modes linear,finetune,toast --transfer-epochs 30 --pretune-epochs 3 \
        --source-epochs 20 --name toast_shapes                       # the richer source task (tuned)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Figure, mean_std, timeit, train_stage, tuned, tuned_by, tuned_overrides, variant_key,  # noqa: E402
                    write_results)

from methodlab.config import load_config  # noqa: E402
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.base import DataBundle, StepContext  # noqa: E402
from methodlab.methods.toast import SCRATCH_VIT, SOURCE_VIT, Toast, expected_trainable, trains  # noqa: E402
from methodlab.models.hub import save_pretrained  # noqa: E402
from methodlab.models.vit import TopDownViT  # noqa: E402
from methodlab.registry import get_method  # noqa: E402
from methodlab.train.core import load_bundle, seed_everything  # noqa: E402

MODES = ["linear", "finetune", "toast", "toast-lite"]
LRS = [1e-3, 1e-2, 1e-1]
CPU = torch.device("cpu")


def bundle(cfg) -> DataBundle:
    info = resolve_dataset(cfg.data.dataset or get_method(cfg.method_name).default_dataset, cfg.data.root)
    return load_bundle(cfg, info, ["train", "val", "test"])


def run_inprocess(cfg) -> tuple[object, dict, dict]:
    """One run of `cfg` through the method's hooks on a single in-process worker:
    (method, final models, val and test metrics of the final-epoch model)."""
    seed_everything(cfg.train.seed)
    data = bundle(cfg)
    method = get_method(cfg.method_name)(cfg, data)
    models: dict = {}
    for stage in method.stages:
        models = train_stage(method, stage, models)
    metrics = {**method.evaluate(method.stages[-1], models, "val", CPU),
               **method.evaluate(method.stages[-1], models, "test", CPU)}
    return method, models, metrics


def step_time(overrides: list[str], mode: str) -> float:
    """Median seconds of one transfer train_step (batch 32) in `mode`."""
    cfg = load_config("toast", None, [*overrides, f"method.mode={mode}"])
    data = bundle(cfg)
    method = get_method("toast")(cfg, data)
    models = method.build_models("transfer", method.build_models("pretune", {}))
    opts = method.build_optimizers("transfer", models)
    ctx = StepContext(stage="transfer", epoch=0, step=0, device=CPU, rank=0, world_size=1,
                      extra={"schedulers": method.build_schedulers("transfer", opts, 10_000)})
    batch = next(data.splits["val"].batches(32))
    models["model"].train()
    return timeit(lambda: method.train_step("transfer", models, opts, batch, ctx), repeat=30, warmup=3)


def flow(kwargs: dict) -> str:
    """A dict as the one-line YAML flow mapping a config override takes."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"


def chosen_on_val(base: list[str], choices: list[list[str]], log: str, t_start: float) -> tuple[float, dict, list]:
    """The final-epoch target test accuracy of the choice (its overrides: lr, optimizer) with the
    best target val accuracy, that choice, and every run's (val, test)."""
    runs = []
    for choice in choices:
        cfg = load_config("toast", None, [*base, *choice])
        lr, optimizer = cfg.train.lr, cfg.train.optimizer
        t0 = time.time()
        _, _, metrics = run_inprocess(cfg)
        runs.append({"val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"], "lr": lr, "optimizer": optimizer})
        print(f"[{time.time() - t_start:.0f}s] {log} {optimizer} lr={lr:g} test_acc={metrics['test_acc']:.4f} "
              f"val_acc={metrics['val_acc']:.4f} ({time.time() - t0:.1f}s)", flush=True)
    best = max(runs, key=lambda r: r["val_acc"])
    return best["test_acc"], {"lr": best["lr"], "optimizer": best["optimizer"]}, runs


def vit_of(args) -> dict:
    """The source ViT's size from the command line (`--patch-size`, `--embed-dim`, `--depth`)."""
    return {"patch_size": args.patch_size, "embed_dim": args.embed_dim, "depth": args.depth,
            "num_heads": SCRATCH_VIT["num_heads"]}


def pretrain_source(source: str, vit: dict, epochs: int, path: str) -> dict:
    """The backbone every transfer mode starts from: the ViT `vit` trained with the supervised
    method on `source` (seed 0, lr 1e-3; deterministic on one CPU thread), saved to `path`.
    Returns what it reached and how (bench/tune.py's TOAST sweeps start from the same one)."""
    probe = load_config("supervised", None, [f"data.dataset={source}"])
    image_shape = resolve_dataset(source, probe.data.root).columns["image"].shape
    cfg = load_config("supervised", None, [f"data.dataset={source}", "method.arch=vit",
                                           f"method.arch_kwargs={flow({'img_size': image_shape[-1], **vit})}",
                                           f"train.epochs={epochs}", "train.lr=1e-3"])
    t0 = time.time()
    sup, models, metrics = run_inprocess(cfg)
    save_pretrained(models["net"], sup.spec(), path)
    return {"dataset": source, **metrics, "spec": sup.spec(), "epochs": epochs, "seconds": round(time.time() - t0, 1)}


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="TOAST transfer benchmark")
    parser.add_argument("--source", default="digits_source", help="dataset the backbone is pretrained on")
    parser.add_argument("--dataset", default=Toast.default_dataset, help="the transfer task (with source_train)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--lrs", type=floats, default=LRS)
    parser.add_argument("--optimizers", default="adamw", help="comma list of adamw, adam, sgd (official)")
    parser.add_argument("--patch-size", type=int, default=SCRATCH_VIT["patch_size"])
    parser.add_argument("--embed-dim", type=int, default=SCRATCH_VIT["embed_dim"])
    parser.add_argument("--depth", type=int, default=SCRATCH_VIT["depth"])
    parser.add_argument("--source-epochs", type=int, default=30)
    parser.add_argument("--pretune-epochs", type=int, default=None, help="default: the method's")
    parser.add_argument("--transfer-epochs", type=int, default=None, help="default: the method's")
    parser.add_argument("--name", default="toast", help="bench/results/<name>.json")
    parser.add_argument("--untuned", action="store_true",
                        help="ignore bench/results/tuned.json (bench/tune.py's sweeps): every mode on the --lrs grid")
    args = parser.parse_args(argv)
    modes, optimizers, seeds = args.modes.split(","), args.optimizers.split(","), list(range(args.seeds))
    # One thread: the tiny models gain nothing from more, and a shared CPU punishes oversubscription.
    torch.set_num_threads(1)
    t_start = time.time()
    figures: list[Figure] = []
    extra: dict = {"argv": sys.argv[1:] if argv is None else list(argv), "dataset": args.dataset,
                   "source": args.source}

    # 1. trainable-parameter fraction per mode, ViT-B/16 (formula, checked against a built model)
    for name, vit, k in [("vit_b16_1000cls", {}, 1000), ("demo_vit_5cls", {**SOURCE_VIT, "in_channels": 1}, 5)]:
        full = TopDownViT(vit, k, 4)
        kw = {"embed_dim": 768, "depth": 12, **vit}
        backbone_total = sum(p.numel() for p in full.backbone.parameters()) + kw["embed_dim"] * k + k
        for mode in MODES:
            # finetune trains the plain ViT with its head; the other modes follow the official name rules
            counted = backbone_total if mode == "finetune" else sum(
                p.numel() for n, p in full.named_parameters()
                if trains(mode, n) and (mode == "toast-lite" or ".lora_" not in n))
            formula = expected_trainable(mode, kw["embed_dim"], kw["depth"], k, 4, backbone_total)
            assert counted == formula, (name, mode, counted, formula)
            figures.append(Figure(f"trainable_fraction_{mode}_{name}", ratio=counted / backbone_total,
                                  baseline="all parameters of the ViT with its head (full fine-tune)",
                                  detail={"trainable": counted, "vit_total": backbone_total}))
        del full

    # 2. source backbone, then 3. step time and accuracy on the transfer task
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("METHODLAB_HOME", os.path.join(tmp, "home"))
        backbone = os.path.join(tmp, "vit_source.pt")
        vit = vit_of(args)
        extra["source_backbone"] = pretrain_source(args.source, vit, args.source_epochs, backbone)
        print(f"source backbone on {args.source}: {extra['source_backbone']}", flush=True)

        common = [f"data.dataset={args.dataset}"]
        if args.pretune_epochs is not None:
            common.append(f"method.pretune_epochs={args.pretune_epochs}")
        if args.transfer_epochs is not None:
            common.append(f"train.epochs={args.transfer_epochs}")
        pretrained = [*common, f"method.backbone={backbone}"]
        times = {mode: step_time(pretrained, mode) for mode in ("toast", "finetune")}
        figures.append(Figure("step_time_toast_vs_finetune", ratio=times["toast"] / times["finetune"],
                              baseline="full fine-tune train_step, same ViT, batch 32, CPU",
                              detail={"toast_ms": 1e3 * times["toast"], "finetune_ms": 1e3 * times["finetune"]}))

        # The same ViT, randomly initialised: what the linear probe reaches without pretraining.
        random_init = [*common, "method.backbone=scratch", f"method.scratch_kwargs={flow(vit)}"]
        results: dict[str, list[float]] = {m: [] for m in modes}
        chosen: dict[str, list[dict]] = {m: [] for m in modes}
        runs: dict[str, list] = {m: [] for m in [*modes, "linear_random_init"]}
        random_probe: list[float] = []
        grid = [[f"train.lr={lr}", f"train.optimizer={optimizer}"] for optimizer in optimizers for lr in args.lrs]
        # bench/tune.py's sweep of a mode on this task, where there is one: its choice for every seed
        swept = {} if args.untuned else {m: tuned("toast").get(variant_key(m, args.dataset)) for m in modes}
        extra["tuned"] = {m: tuned_by(swept.get(m)) if swept.get(m) else f"chosen on val per seed from {grid}"
                          for m in modes}
        for seed in seeds:
            for mode in modes:
                choices = [tuned_overrides(swept[mode])] if swept.get(mode) else grid
                acc, choice, all_runs = chosen_on_val([*pretrained, f"method.mode={mode}", f"train.seed={seed}"],
                                                      choices, f"seed {seed} {mode:10s}", t_start)
                results[mode].append(acc)
                chosen[mode].append(choice)
                runs[mode].append(all_runs)
            # (the precondition's reference: on the grid, whatever the modes were tuned by)
            acc, _, all_runs = chosen_on_val([*random_init, "method.mode=linear", f"train.seed={seed}"], grid,
                                             f"seed {seed} linear (random-init backbone)", t_start)
            random_probe.append(acc)
            runs["linear_random_init"].append(all_runs)
        base_mode = "finetune" if "finetune" in modes else modes[0]
        base = statistics.mean(results[base_mode])
        for mode in modes:
            figures.append(Figure(f"target_test_acc_{mode}", ratio=statistics.mean(results[mode]) / base,
                                  baseline=f"{base_mode} (mean target test accuracy, same seeds)",
                                  detail={"test_acc": mean_std(results[mode]), "per_seed": results[mode],
                                          "chosen_on_val": json.dumps(chosen[mode])}))
        extra["accuracy"] = {m: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                 "per_seed": v, "chosen_on_val": chosen[m]} for m, v in results.items()}
        if "linear" in modes:
            gain = [p - r for p, r in zip(results["linear"], random_probe)]
            figures.append(Figure("precondition_backbone_transfers", ratio=statistics.mean(gain),
                                  baseline="score (linear probe: pretrained minus random-init backbone, "
                                  "target test acc)", detail={"per_seed": mean_std(gain)}))
        # bench/quality.py gates the TOAST claims on this: the pretrained probe against the random one.
        extra["preconditions"] = {"claim": "the backbone transfers at all", "random_init_linear": random_probe,
                                  "definition": "target test acc of the linear probe on a random-init "
                                                "backbone of the same ViT (lr chosen on val), per seed; "
                                                "compare accuracy.linear.per_seed"}
        extra["runs"] = runs
    extra["setup"] = (f"in-process single worker, no Ray; backbone pretrained on {args.source} "
                      f"({args.source_epochs} epochs, ViT {vit}); transfer on {args.dataset}; defaults of "
                      "`methodlab train toast` (wd 1e-4, batch 32) with overrides "
                      f"{common}; each mode's lr from its bench/tune.py sweep where one exists (`tuned`), "
                      f"else lr in {args.lrs} x optimizer in {optimizers} chosen per mode and seed on target "
                      f"val_acc of the final-epoch model; seeds {seeds}")
    extra["seconds"] = round(time.time() - t_start, 1)
    write_results(args.name, figures, extra)


if __name__ == "__main__":
    main()
