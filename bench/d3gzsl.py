"""D3GZSL against its generative baseline (plain f-CLSWGAN: lambda_id = lambda_od = 0).

1. digits-GZSL, 3 seeds: test S, U, H of D3GZSL (paper weights 1e-4) for both loss variants
   (`faithful`, `clean`) and of the baseline (weights 0: the loss variant does not enter, so one
   baseline run per seed serves both). Headline protocol end-to-end (the student), with the fresh
   classifier protocol reported alongside. protocol=final (all 7 seen digits trained on, the
   literature setting); the last epoch is scored, no model selection at all.
2. Synthetic data at CUB scale (2048-d features, 312 attributes, 150 seen / 50 unseen classes,
   7050 training rows) with the official network sizes (G/D hidden 4096, embeddings 2048): time of
   one generator iteration (5 critic steps of 256 rows + 1 generator step, each with 250 synthetic
   unseen features) and its peak resident memory above the state before the step, each variant
   in a fresh subprocess (VmHWM reset through /proc/self/clear_refs).

Everything runs in this process (part 2 in child processes) with the method's own hooks and the
platform's data order, on one worker and without Ray: the figures are about the method, not the
platform. Ratios are against the baseline measured by this same script.

    .venv/bin/python bench/d3gzsl.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("METHODLAB_HOME", tempfile.mkdtemp(prefix="methodlab-bench-"))

import torch  # noqa: E402

from common import Figure, mean_std, timeit, train_stage, write_results  # noqa: E402
from methodlab.config import load_config  # noqa: E402
from methodlab.data import open_dataset, resolve_dataset  # noqa: E402
from methodlab.data.dataset import write_dataset  # noqa: E402
from methodlab.data.gzsl import synthetic_gzsl  # noqa: E402
from methodlab.methods.base import StepContext  # noqa: E402
from methodlab.methods.d3gzsl import D3GZSL  # noqa: E402
from methodlab.train.core import load_bundle, seed_everything  # noqa: E402

SEEDS = (0, 1, 2)
BASELINE = ["method.lambda_id=0", "method.lambda_od=0"]
VARIANTS = {"baseline": BASELINE, "d3gzsl-faithful": ["method.loss_variant=faithful"],
            "d3gzsl-clean": ["method.loss_variant=clean"]}
# Smaller than the method's digits preset (150 epochs, 512 hidden) so that 9 runs fit the
# bench's time budget on a shared 2-core CPU.
DIGITS = ["method.protocol=final", "train.epochs=50", "method.gen_hidden=256", "method.critic_hidden=256"]
CPU = torch.device("cpu")


def build(overrides: list[str], info) -> D3GZSL:
    cfg = load_config("d3gzsl", None, overrides)
    seed_everything(cfg.train.seed)
    return D3GZSL(cfg, load_bundle(cfg, info, ["train", "val", "test"]))


def digits_accuracy() -> tuple[list[Figure], dict]:
    info = resolve_dataset("digits_gzsl", load_config("d3gzsl").data.root)
    scores: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in SEEDS:
        for name, overrides in VARIANTS.items():
            t0 = time.perf_counter()
            method = build([*DIGITS, f"train.seed={seed}", *overrides], info)
            models = train_stage(method, "gan", train_stage(method, "teacher", {}))
            test = method.evaluate("gan", models, "test", CPU)
            scores[name].append(test)
            print(f"seed {seed} {name:16s} S={test['test_S']:.3f} U={test['test_U']:.3f} H={test['test_H']:.3f} "
                  f"ZSL={test['test_ZSL']:.3f} fresh H={test['test_fresh_H']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    figures, table = [], {}
    base_h = statistics.mean(s["test_H"] for s in scores["baseline"])
    for name, runs in scores.items():
        detail = {k: mean_std([r[f"test_{k}"] for r in runs]) for k in ("S", "U", "H", "ZSL")}
        detail.update({f"fresh_{k}": mean_std([r[f"test_fresh_{k}"] for r in runs]) for k in ("S", "U", "H", "ZSL")})
        table[name] = {k: [r[k] for r in runs] for k in runs[0]}
        h = statistics.mean(r["test_H"] for r in runs)
        figures.append(Figure(f"digits_gzsl_H_{name}", h / base_h if base_h > 0 else None,
                              "baseline (lambda_id = lambda_od = 0) test H", detail))
    return figures, table


def _peak_step(overrides: list[str], root: str, repeat: int, queue) -> None:
    """Child process: seconds per generator iteration and peak RSS growth over the steps."""
    torch.set_num_threads(1)
    method = build(overrides, open_dataset(root))
    models = method.build_models("gan", method.build_models("teacher", {}))
    optimizers = method.build_optimizers("gan", models)
    batch = {k: v[:1280] for k, v in method.data.splits["train"].tensors.items()}
    ctx = StepContext(stage="gan", epoch=0, step=0, device=CPU, rank=0, world_size=1)

    def step():
        method.train_step("gan", models, optimizers, batch, ctx)

    step()                                  # allocates the optimizer state
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                        # resets VmHWM to the current RSS
    seconds = timeit(step, repeat=repeat, warmup=0)
    queue.put((seconds, (_status_kb("VmHWM") - before) / 1024))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def cub_scale_cost() -> tuple[list[Figure], dict]:
    built = synthetic_gzsl(n_seen=150, n_unseen=50, n_val_unseen=50, feature_dim=2048, attribute_dim=312,
                           train_per_class=52, test_per_class=2, seed=0)
    root = os.path.join(os.environ["METHODLAB_HOME"], "synthetic-cub")
    write_dataset(root, "synthetic-cub", built["splits"], built["meta"], built["tables"])
    official = ["method.protocol=final", "train.batch_size=1280", "method.gen_hidden=4096",
                "method.critic_hidden=4096", "method.embed_dim=2048", "train.lr=1e-4"]
    ctx = mp.get_context("spawn")
    measured = {}
    for name, overrides in VARIANTS.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_step, args=([*official, *overrides], root, 3, queue))
        proc.start()
        measured[name] = queue.get()
        proc.join()
        print(f"CUB scale {name:16s} {measured[name][0]:.2f} s/generator iteration, "
              f"peak +{measured[name][1]:.0f} MiB", flush=True)
    base_t, base_m = measured["baseline"]
    figures = []
    for name, (t, mem) in measured.items():
        figures.append(Figure(f"cub_scale_step_time_{name}", t / base_t, "baseline s/generator iteration",
                              {"seconds": t, "baseline_seconds": base_t}))
        figures.append(Figure(f"cub_scale_peak_memory_{name}", mem / base_m if base_m > 0 else None,
                              "baseline peak RSS growth during the step",
                              {"MiB": mem, "baseline_MiB": base_m}))
    return figures, {k: {"seconds": v[0], "peak_MiB": v[1]} for k, v in measured.items()}


def main() -> None:
    torch.set_num_threads(1)                # tiny networks on a shared 2-core box
    t0 = time.perf_counter()
    digit_figures, digit_table = digits_accuracy()
    cub_figures, cub_table = cub_scale_cost()
    write_results("d3gzsl", digit_figures + cub_figures, {
        "in_process": "one worker, no Ray; the method's hooks and the platform's data order",
        "digits_overrides": DIGITS, "seeds": list(SEEDS), "digits_per_seed": digit_table,
        "cub_scale": cub_table, "torch_threads": 1, "total_seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
