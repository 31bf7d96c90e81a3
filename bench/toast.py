"""TOAST benchmark: trainable-parameter fraction per mode, step time of TOAST vs full fine-tuning,
and target test accuracy of linear / finetune / toast / toast-lite on the built-in transfer task
(digits 0-4 -> 5-9, 10 labelled images per class) over 3 seeds.

Runs in-process on one worker, without Ray (so it fits the time budget on a 2-core CPU): the
method's own hooks (build_models, build_optimizers, build_schedulers, train_step, evaluate) are
driven by a minimal single-worker loop over the platform's seeded batches. The source backbone is
the demo's ViT, pretrained here with the supervised method on digits_source.

    .venv/bin/python bench/toast.py
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
from methodlab.data import resolve_dataset  # noqa: E402
from methodlab.methods.base import DataBundle, StepContext  # noqa: E402
from methodlab.methods.toast import SOURCE_VIT, expected_trainable, trains  # noqa: E402
from methodlab.models.hub import save_pretrained  # noqa: E402
from methodlab.models.vit import TopDownViT  # noqa: E402
from methodlab.registry import get_method  # noqa: E402
from methodlab.train.core import load_bundle, seed_everything  # noqa: E402

MODES = ["linear", "finetune", "toast", "toast-lite"]
LRS = [1e-3, 1e-2]
SEEDS = [0, 1, 2]
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


def step_time(backbone: str, mode: str) -> float:
    """Median seconds of one transfer train_step (batch 32) in `mode`."""
    cfg = load_config("toast", None, [f"method.backbone={backbone}", f"method.mode={mode}"])
    data = bundle(cfg)
    method = get_method("toast")(cfg, data)
    models = method.build_models("transfer", method.build_models("pretune", {}))
    opts = method.build_optimizers("transfer", models)
    ctx = StepContext(stage="transfer", epoch=0, step=0, device=CPU, rank=0, world_size=1,
                      extra={"schedulers": method.build_schedulers("transfer", opts, 10_000)})
    batch = next(data.splits["val"].batches(32))
    models["model"].train()
    return timeit(lambda: method.train_step("transfer", models, opts, batch, ctx), repeat=30, warmup=3)


def main() -> None:
    # One thread: the tiny models gain nothing from more, and a shared CPU punishes oversubscription.
    torch.set_num_threads(1)
    t_start = time.time()
    figures: list[Figure] = []
    extra: dict = {}

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
        kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in SOURCE_VIT.items()) + "}"
        sup_cfg = load_config("supervised", None, ["data.dataset=digits_source", "method.arch=vit",
                                                   f"method.arch_kwargs={kwargs}", "train.epochs=30",
                                                   "train.lr=1e-3"])
        t0 = time.time()
        sup, sup_models, source_metrics = run_inprocess(sup_cfg)
        save_pretrained(sup_models["net"], sup.spec(), backbone)
        extra["source_backbone"] = {**source_metrics, "spec": sup.spec(), "seconds": round(time.time() - t0, 1)}
        print(f"source backbone on digits_source: {source_metrics}", flush=True)

        times = {mode: step_time(backbone, mode) for mode in ("toast", "finetune")}
        figures.append(Figure("step_time_toast_vs_finetune", ratio=times["toast"] / times["finetune"],
                              baseline="full fine-tune train_step, same ViT, batch 32, CPU",
                              detail={"toast_ms": 1e3 * times["toast"], "finetune_ms": 1e3 * times["finetune"]}))

        results: dict[str, list[float]] = {m: [] for m in MODES}
        chosen: dict[str, list[float]] = {m: [] for m in MODES}
        for seed in SEEDS:
            for mode in MODES:
                # Each mode gets its learning rate picked on the target val split (final epoch).
                runs = []
                for lr in LRS:
                    cfg = load_config("toast", None, [f"method.backbone={backbone}", f"method.mode={mode}",
                                                      f"train.seed={seed}", f"train.lr={lr}"])
                    t0 = time.time()
                    _, _, metrics = run_inprocess(cfg)
                    runs.append((metrics["val_acc"], lr, metrics["test_acc"]))
                    print(f"[{time.time() - t_start:.0f}s] seed {seed} {mode:10s} lr={lr:g} "
                          f"test_acc={metrics['test_acc']:.4f} val_acc={metrics['val_acc']:.4f} "
                          f"({time.time() - t0:.1f}s)", flush=True)
                _, lr, test_acc = max(runs)
                results[mode].append(test_acc)
                chosen[mode].append(lr)
        base = statistics.mean(results["finetune"])
        for mode in MODES:
            figures.append(Figure(f"target_test_acc_{mode}", ratio=statistics.mean(results[mode]) / base,
                                  baseline="full fine-tune (mean target test accuracy, same seeds)",
                                  detail={"test_acc": mean_std(results[mode]), "per_seed": results[mode],
                                          "lr_chosen_on_val": chosen[mode]}))
        extra["accuracy"] = {m: {"mean": statistics.mean(v), "std": statistics.stdev(v), "per_seed": v}
                             for m, v in results.items()}
    extra["setup"] = ("in-process single worker, no Ray; digits_transfer (10 shots/class); defaults of "
                      "`methodlab train toast` (adamw wd 1e-4, 60 transfer epochs, batch 32, pretune 10 epochs "
                      f"for toast modes) with lr in {LRS} chosen per mode and seed on target val_acc of "
                      "the final-epoch model; "
                      f"seeds {SEEDS}")
    extra["seconds"] = round(time.time() - t_start, 1)
    write_results("toast", figures, extra)


if __name__ == "__main__":
    main()
