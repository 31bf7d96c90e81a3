"""Platform overhead on a workload with ~11 s epochs: a ResNet (width 16, `method.arch=resnet`) on
synthetic 3x32x32 images in 10 learnable classes, batch 64 per rank, 1 thread per process, fp32 on CPU.

  steady_state_epoch_1worker           methodlab, 1 Ray Train worker, a checkpoint every epoch,
                                       against a plain single-process loop                (goal <= 1.05)
  steady_state_epoch_2worker           methodlab, 2 workers, a checkpoint every epoch, against
                                       torch.multiprocessing DDP, 2 processes, gloo       (goal <= 1.05)
  steady_state_epoch_2worker_ckpt300s  the same with train.checkpoint_every=0 train.checkpoint_every_s=300
                                       (only the last epoch is checkpointed)              (goal <= 1.02)
  startup_1worker                      the run's `startup_s`, train() call to first optimizer step,
                                       against the plain loop's data + model set-up     (goal <= 12 s)
  checkpoint_<size>mb_<mode>           training time lost per checkpoint, 10 MB and 500 MB of state,
                                       modes sync_every_epoch / async_every_epoch / every_n_s

The baselines are what a researcher writes by hand with the same model, Adam (lr from the
supervised defaults), per-rank batch, data order (`shard_indices` of `epoch_seed`, as the platform
draws it) and a validation pass every epoch; DDP ranks each evaluate a contiguous shard of val and
all_reduce the correct count. BatchNorm is per rank in both (methodlab: scaling.sync_batchnorm=false). Each rank trains on 12,800 rows per epoch (the 2-rank runs on a split
twice as large), so 1 and 2 workers do the same per-rank work; 5 epochs.

Steady-state epoch = median of the periods between consecutive epochs after the first, read from
MLflow (the `epoch` records' timestamps), so it includes evaluation, the checkpoint, report() and
the MLflow write: everything the platform adds. Details give `fixed_cost_s` (methodlab steady
epoch - baseline steady epoch) and the medians of the loop's phase timers (`time_*_s` metrics).

Checkpoint grid: 1 worker, 8 short epochs. The state is made big with a wide classifier head (the
resnet's `num_classes` raised to 6,502 / 383,425; labels stay in 0..9), because a network whose
body holds 500 MB would take minutes per step on a CPU. State ~ params x 4 B x (weights, 2 Adam
moments, the exported model, the best epoch's model); the measured state file is in the detail.
Every run keeps all its checkpoints (num_to_keep = epochs), so those written after the first epoch
can be counted from their position (history_step, batch); the baseline run checkpoints only its
last epoch (train.checkpoint_every=0). Time lost per checkpoint = (time of epochs 2..8 - the
baseline's) / (their checkpoints - the baseline's); the ratio is that time over the baseline's.
Sums, not medians: time-based checkpoints land in a few epochs only.

A run the platform refuses (a config key it does not have) or that fails is reported as n/a with
its one-line error; the other runs still go ahead.

    .venv/bin/python bench/overhead.py                            # about 15 min on 2 CPU cores
    BENCH_OVERHEAD_SCALE=tiny .venv/bin/python bench/overhead.py  # smoke test, figures meaningless
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "METHODLAB_HOME" not in os.environ:   # DDP ranks re-import this module: they inherit it
    os.environ["METHODLAB_HOME"] = tempfile.mkdtemp(prefix="methodlab-bench-")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train starts each 1-CPU worker with OMP_NUM_THREADS=1 (before torch is imported); the
# baselines, in this process and its DDP children, get the same.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import Figure, write_results  # noqa: E402
from methodlab.config import load_config, methodlab_home  # noqa: E402
from methodlab.data import open_dataset, read_split, write_dataset  # noqa: E402
from methodlab.errors import MethodlabError  # noqa: E402
from methodlab.models import build_model  # noqa: E402
from methodlab.train.core import STATE_FILE, LoopState, epoch_seed, shard_indices  # noqa: E402

TINY = os.environ.get("BENCH_OVERHEAD_SCALE") == "tiny"   # every code path in ~4 min, no real figures
BATCH = 64                                       # per rank
WIDTH = 16
ROWS_PER_RANK = 640 if TINY else 12_800          # 200 steps: ~10 s at 1 thread here, + ~1.2 s of val
EVAL_ROWS = 128 if TINY else 1_000
EPOCHS = 3 if TINY else 5
GRID_EPOCHS = 4 if TINY else 8
STATE_BYTES_PER_PARAM = 20                       # 4 B x (weights, 2 Adam moments, exported, best model)
RUN_TAG = time.strftime("%m%d-%H%M%S")           # fresh run names: a finished run's name is not re-run
STARTUP_S = 25                                   # per methodlab run: Ray Train start, registration (estimate)


@dataclass(frozen=True)
class Workload:
    dataset: str
    rows: int                     # training rows per rank and epoch
    epochs: int
    classes: int = 10             # the head's width; wider only makes the checkpoint bigger
    ms_per_row: tuple[float, float] = (0.8, 1.2)   # train, eval at 1 thread here: the printed estimate

    @property
    def arch_kwargs(self) -> dict:
        return {"width": WIDTH, "num_classes": self.classes}

    def spec(self) -> dict:
        """The model `Supervised.spec()` builds for these overrides."""
        return {"arch": "resnet", "kwargs": {"in_channels": 3, **self.arch_kwargs}}

    def overrides(self, workers: int) -> list[str]:
        # Per-rank BatchNorm, as native DDP has it (torch's SyncBatchNorm has no CPU path): the
        # platform's global BatchNorm is other math, with a collective per layer and step.
        per_rank_bn = ["scaling.sync_batchnorm=false"] if workers > 1 else []
        return [f"data.dataset={self.dataset}", f"data.limit_rows={self.rows * workers}", "method.arch=resnet",
                f"method.arch_kwargs={json.dumps(self.arch_kwargs)}", f"train.epochs={self.epochs}", *per_rank_bn]

    def expected_s(self, eval_rows: int) -> float:
        return self.epochs * (self.rows * self.ms_per_row[0] + eval_rows * self.ms_per_row[1]) / 1000


@dataclass(frozen=True)
class GridSize:
    mb: int                       # checkpoint state aimed at
    rows: int                     # training rows per epoch: a few steps, so the checkpoint shows
    every_s: float                # the checkpoint_every_s cadence: about every third epoch
    ms_per_row: tuple[float, float]


GRID_EVAL_ROWS = 64 if TINY else 256
GRID = ([GridSize(2, 256, 2, (0.9, 0.8)), GridSize(20, 128, 2, (1.2, 1.0))] if TINY else
        [GridSize(10, 2_560, 8, (0.9, 0.8)), GridSize(500, 512, 20, (8.0, 3.5))])


class Measured(NamedTuple):
    # (startup_s, periods, wall_s) first: bench/data_path.py reads through_methodlab(...)[1].
    startup_s: float | None       # to the first optimizer step
    periods: list[float]          # seconds per epoch, in order
    wall_s: float
    val_acc: float | None
    phases: dict[str, float] = {}   # methodlab: median per-epoch phase timers after the first epoch
    storage: str = ""             # methodlab: where the run's checkpoints are


def steady(m: Measured) -> float:
    return statistics.median(m.periods[1:])


# ----------------------------------------------------------------------------------------------
# Data


def synthetic_images(name: str, n_train: int, n_eval: int) -> str:
    """3x32x32 float32 images whose class is a fixed random pattern (amplitude 0.3) under unit
    noise: learnable, so the runs' val_acc show the same training happened. Returns the URI."""
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((10, 3, 32, 32), dtype=np.float32)

    def split(n: int) -> dict[str, np.ndarray]:
        labels = rng.integers(0, 10, n)
        noise = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        return {"image": noise + np.float32(0.3) * patterns[labels], "label": labels.astype(np.int64)}

    uri = str(methodlab_home() / "data" / name)
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    write_dataset(uri, name, {"train": split(n_train), "val": split(n_eval), "test": split(n_eval)},
                  {"num_classes": 10, "classes": [str(c) for c in range(10)], "source": "bench/overhead.py"})
    return uri


def tensors(info, split: str, limit_rows: int | None = None) -> dict[str, torch.Tensor]:
    # Arrow's zero-copy views are read-only; torch wants writable memory.
    return {k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
            for k, v in read_split(info, split, limit_rows).items()}


# ----------------------------------------------------------------------------------------------
# Baselines


@torch.no_grad()
def correct_count(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correctly classified rows, in batches of 512 as the platform's `classify_accuracy`."""
    net.eval()
    correct = torch.zeros(1, dtype=torch.float64)
    for s in range(0, len(labels), 512):
        correct += (net(images[s:s + 512]).argmax(-1) == labels[s:s + 512]).sum()
    return correct


def baseline(rank: int, world: int, w: Workload, port: int) -> Measured:
    """The hand-written loop: 1 process (world 1) or one DDP rank of `world` over gloo."""
    # Ray Train gives each worker OMP_NUM_THREADS = its CPU share (1 here); the baseline gets the
    # same, so the ratio measures the platform rather than a different thread count.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    defaults = load_config("supervised").train
    torch.manual_seed(defaults.seed)
    info = open_dataset(w.dataset)
    train = tensors(info, "train", w.rows * world)
    val = tensors(info, "val")
    per_rank = -(-len(val["label"]) // world)
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    net = build_model(w.spec())
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    startup, periods = None, []
    for epoch in range(w.epochs):
        t = time.perf_counter()
        model.train()
        idx = shard_indices(len(train["label"]), rank, world, epoch_seed(defaults.seed, 0, epoch))
        for s in range(0, len(idx), BATCH):
            rows = idx[s:s + BATCH]
            loss = F.cross_entropy(model(train["image"][rows]), train["label"][rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            startup = startup if startup is not None else time.perf_counter() - t0
        if world > 1:
            # Each rank's last forward left its own BatchNorm statistics; the shards must all be
            # evaluated with one model, rank 0's (the unwrapped net: no DDP forward collectives).
            for buf in net.buffers():
                dist.broadcast(buf, src=0)
        correct = correct_count(net, val["image"][shard], val["label"][shard])
        if world > 1:
            dist.all_reduce(correct)
        periods.append(time.perf_counter() - t)
    if world > 1:
        dist.destroy_process_group()
    return Measured(startup, periods, time.perf_counter() - t0, float(correct[0]) / len(val["label"]))


def _ddp_rank(rank: int, world: int, w: Workload, port: int, results) -> None:
    m = baseline(rank, world, w, port)
    if rank == 0:
        results.put(m)


def native_ddp(w: Workload, world: int) -> Measured:
    """torch.multiprocessing.spawn of `world` DDP ranks; rank 0's timings."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_rank, args=(world, w, port, results), nprocs=world, join=True)
    return results.get()


# ----------------------------------------------------------------------------------------------
# Through methodlab


def through_methodlab(workers: int, tag: str, extra: tuple[str, ...] | list[str] = ()) -> Measured:
    """`methodlab.train.launch.train` of the supervised method with `extra` overrides; the
    timings from its MLflow run. A refused config (ConfigError) raises before anything starts."""
    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    cfg = load_config("supervised", None, [f"train.batch_size={BATCH}", f"scaling.num_workers={workers}",
                                           "scaling.cpus_per_worker=1", f"train.run_name=overhead-{tag}-{RUN_TAG}",
                                           *extra])
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    client = Tracker(cfg.tracking.uri, cfg.tracking.experiment).client

    def history(key: str) -> list:
        return sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)

    # Epoch period = time between consecutive epochs' MLflow records: training, evaluation,
    # the checkpoint, report() and the MLflow write, i.e. everything the platform adds.
    stamps = [m.timestamp / 1000 for m in history("epoch_seconds")]
    periods = [history("epoch_seconds")[0].value] + [b - a for a, b in zip(stamps, stamps[1:])]
    phases = {}
    for key in sorted(k for k in summary.metrics if k.startswith("time_")):
        values = [m.value for m in history(key)]
        phases[key] = statistics.median(values[1:] or values)
    return Measured(summary.metrics.get("startup_s"), periods, wall, summary.metrics.get("val_acc"), phases,
                    f"{cfg.storage.path.rstrip('/')}/{cfg.run_name}")


def attempt(workers: int, tag: str, extra: list[str]) -> Measured | MethodlabError:
    try:
        m = through_methodlab(workers, tag, extra)
    except MethodlabError as e:
        print(f"[overhead] {tag}: n/a, {e}", flush=True)
        return e
    print(f"[overhead] {tag}: epochs {' '.join(f'{p:.2f}' for p in m.periods)} s, wall {m.wall_s:.1f} s", flush=True)
    return m


def epoch_figure(name: str, m: Measured | MethodlabError, base: Measured, baseline_name: str, goal: str) -> Figure:
    if isinstance(m, MethodlabError):
        return Figure(name, None, baseline_name, {"error": str(m)}, goal)
    s, b = steady(m), steady(base)
    return Figure(name, s / b, baseline_name, {"epoch_s": s, "baseline_epoch_s": b, "fixed_cost_s": s - b,
                                               "val_acc": m.val_acc, "baseline_val_acc": base.val_acc, **m.phases},
                  goal)


def startup_figure(m: Measured | MethodlabError, plain: Measured) -> Figure:
    name, baseline_name, goal = "startup_1worker", "plain loop's data + model set-up", "startup_s <= 12"
    if isinstance(m, MethodlabError):
        return Figure(name, None, baseline_name, {"error": str(m)}, goal)
    ratio = m.startup_s / plain.startup_s if m.startup_s is not None else None
    return Figure(name, ratio, baseline_name, {"startup_s": m.startup_s if m.startup_s is not None else "n/a",
                                               "plain_startup_s": plain.startup_s, "run_wall_s": m.wall_s}, goal)


# ----------------------------------------------------------------------------------------------
# Checkpoint-size grid


def head_classes(mb: float) -> int:
    """The resnet `num_classes` whose checkpoint state is about `mb` MB (the head dominates)."""
    probe = build_model(Workload("", 0, 0, classes=1).spec())
    body = sum(p.numel() for p in probe.parameters()) - (probe.embed_dim + 1)
    return max(10, round((mb * 1e6 / STATE_BYTES_PER_PARAM - body) / (probe.embed_dim + 1)))


def checkpoints_after_first_epoch(m: Measured) -> tuple[int, float]:
    """How many of the run's checkpoints were written after its first epoch ended (at a later
    epoch's end or mid-epoch), and the largest state file's MB; then deletes them (up to 500 MB each)."""
    files = list(Path(m.storage).rglob(STATE_FILE))
    positions = [(s.history_step, s.batch) for s in map(LoopState.load, (f.parent for f in files))]
    mb = max((f.stat().st_size for f in files), default=0) / 1e6
    shutil.rmtree(m.storage, ignore_errors=True)
    return sum(p > (1, 0) for p in positions), mb


def checkpoint_grid(size: GridSize, dataset: str) -> list[Figure]:
    w = Workload(dataset, size.rows, GRID_EPOCHS, head_classes(size.mb), size.ms_per_row)
    common = [*w.overrides(1), f"train.num_to_keep={GRID_EPOCHS}"]
    modes = {"sync_every_epoch": ["train.checkpoint_upload=sync"],
             "async_every_epoch": ["train.checkpoint_upload=async"],
             "every_n_s": ["train.checkpoint_every=0", f"train.checkpoint_every_s={size.every_s:g}"]}
    names = {mode: f"checkpoint_{size.mb}mb_{mode}" for mode in modes}
    baseline_name = "same run, only the last epoch checkpointed"
    base = attempt(1, f"ckpt{size.mb}mb-last", [*common, "train.checkpoint_every=0"])
    if isinstance(base, MethodlabError):
        return [Figure(n, None, baseline_name, {"error": str(base)}) for n in names.values()]
    base_n, _ = checkpoints_after_first_epoch(base)
    base_s = sum(base.periods[1:])
    figures = []
    for mode, extra in modes.items():
        m = attempt(1, f"ckpt{size.mb}mb-{mode}", [*common, *extra])
        if isinstance(m, MethodlabError):
            figures.append(Figure(names[mode], None, baseline_name, {"error": str(m)}))
            continue
        # Epochs 2.. only: the first period is the loop's own epoch_seconds, without its checkpoint.
        n, mb = checkpoints_after_first_epoch(m)
        s = sum(m.periods[1:])
        detail = {"lost_per_checkpoint_s": (s - base_s) / (n - base_n) if n > base_n else "n/a",
                  "checkpoints": n, "baseline_checkpoints": base_n, "state_mb": mb, "head_classes": w.classes,
                  "epoch_s": s / (GRID_EPOCHS - 1), "baseline_epoch_s": base_s / (GRID_EPOCHS - 1)}
        if mode == "every_n_s":
            detail["checkpoint_every_s"] = size.every_s
        figures.append(Figure(names[mode], s / base_s, baseline_name, {**detail, **m.phases}))
    return figures


# ----------------------------------------------------------------------------------------------


def estimate_s() -> float:
    """Plain loop, DDP and 3 methodlab runs, then 4 methodlab runs per checkpoint size."""
    main = Workload("", ROWS_PER_RANK, EPOCHS).expected_s(EVAL_ROWS)
    grid = [Workload("", g.rows, GRID_EPOCHS, ms_per_row=g.ms_per_row).expected_s(GRID_EVAL_ROWS) for g in GRID]
    return 5 * main + 3 * STARTUP_S + sum(4 * (g + STARTUP_S) for g in grid)


def main() -> None:
    t_start = time.perf_counter()
    print(f"[overhead] {'tiny smoke test' if TINY else 'full benchmark'}: about {estimate_s() / 60:.0f} min "
          f"on 2 CPU cores; METHODLAB_HOME={methodlab_home()}", flush=True)

    images = synthetic_images("overhead-images", 2 * ROWS_PER_RANK, EVAL_ROWS)
    one = Workload(images, ROWS_PER_RANK, EPOCHS)
    # The baselines run before Ray starts: its daemons' CPU time is the platform's.
    plain = baseline(0, 1, one, 0)
    ddp = native_ddp(one, 2)
    print(f"[overhead] plain loop epochs {' '.join(f'{p:.2f}' for p in plain.periods)} s; "
          f"DDP x2 {' '.join(f'{p:.2f}' for p in ddp.periods)} s", flush=True)

    w1 = attempt(1, "w1", one.overrides(1))
    figures = [epoch_figure("steady_state_epoch_1worker", w1, plain, "plain torch loop", "<= 1.05"),
               epoch_figure("steady_state_epoch_2worker", attempt(2, "w2", one.overrides(2)), ddp,
                            "torch.multiprocessing DDP, 2 ranks, gloo", "<= 1.05"),
               epoch_figure("steady_state_epoch_2worker_ckpt300s",
                            attempt(2, "w2-ckpt300s", [*one.overrides(2), "train.checkpoint_every=0",
                                                       "train.checkpoint_every_s=300"]),
                            ddp, "torch.multiprocessing DDP, 2 ranks, gloo", "<= 1.02"),
               startup_figure(w1, plain)]

    grid_data = synthetic_images("overhead-grid", max(g.rows for g in GRID), GRID_EVAL_ROWS)
    for size in GRID:
        figures += checkpoint_grid(size, grid_data)
    write_results("overhead", figures, {
        "scale": "tiny" if TINY else "full", "epochs": EPOCHS, "grid_epochs": GRID_EPOCHS, "batch_size": BATCH,
        "rows_per_rank": ROWS_PER_RANK, "eval_rows": EVAL_ROWS, "model": f"resnet width {WIDTH}",
        "dataset": "synthetic 3x32x32, 10 classes", "threads_per_process": 1,
        "total_s": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
