"""The training core: stages, epochs and steps of any method over given batches, with no Ray.

    loop = Loop(cfg, method, device)                 # rank/world from torch.distributed, if any
    models = loop.fit(LoopState())                   # -> the final stage's models (unwrapped)

`methodlab.train.loop` runs it on every Ray Train worker and adds what Ray and MLflow bring
(`Hooks`: report, checkpoint, MLflow); the benchmarks and tests run it in-process. The structure
follows nanoGPT's train.py (one loop, one place per concern) and Composer's events (the hooks).

What it guarantees, at any world size:
- Exact resume, also mid-epoch: a checkpoint holds models, optimizers, schedulers, the method's
  state, every rank's RNG state and the counters; the data order of an epoch is a pure function
  of (seed, stage, epoch), so a resumed epoch skips the batches it had consumed. That holds for
  the stream loader too (`Stream`): Ray Data's seeded block order and the epoch-seeded shuffle
  buffer (`loop.stream_batches`) replay the same order, so it resumes at the exact batch.
- At most one host sync per log interval (`train.log_every_steps`): losses are summed on the
  device and read, all-reduced, once per interval and at the end of each epoch. The NaN check,
  the wall-clock checkpoint decision and the global train metrics all come from that one read.
  Progress within an epoch (`Hooks.on_progress`, rank 0, every `train.log_every_s`) reads the
  wall clock only and shows the losses of the last such read.
- Sharded evaluation: every rank evaluates its shard (`methodlab.distributed.shard`) and the
  method reduces sums and counts, so every reported metric is the global one.
- The state of a checkpoint is built only when a checkpoint is taken.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from methodlab import distributed
from methodlab.config import RunConfig
from methodlab.console import ProgressClock
from methodlab.data.dataset import DatasetInfo, read_split, read_table
from methodlab.data.decode import column_decoders, decode_batch
from methodlab.data.shared import SharedSplits, limit_rows, memory_splits
from methodlab.methods.base import Batch, DataBundle, Method, SplitData, StepContext, trainable

STATE_FILE = "state.pt"
# In every report of the final stage (the one a method's metric is measured in): its epochs done.
# What ASHA counts (`sweep._fit`), so that trials of a method with a teacher or pretune stage and
# of a baseline without one are compared after the same number of epochs of the metric.
FINAL_STAGE_EPOCH = "final_stage_epoch"


# ----------------------------------------------------------------------------------------------
# Checkpoint state


@dataclass
class LoopState:
    stage_index: int = 0
    epoch: int = 0                # the epoch being (or next to be) run within the stage
    batch: int = 0                # batches of that epoch already trained (a mid-epoch checkpoint)
    step: int = 0                 # optimizer steps so far (all stages)
    history_step: int = 0         # epochs finished (all stages)
    complete: bool = False
    models_stage: int = 0         # the stage whose models `models` holds
    models: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    rng: list = field(default_factory=list)       # one entry per rank
    epoch_losses: dict = field(default_factory=dict)  # the running epoch's global loss sums so far
    metrics: dict = field(default_factory=dict)   # the last finished epoch's metrics
    metrics_stage: str = ""       # the stage that epoch belongs to (MLflow names its metrics by it)
    evaluated: dict = field(default_factory=dict)  # the last evaluation's val metrics
    # The best evaluated epoch of the final stage by the method's metric:
    # {"value", "history_step", "metrics", "models"}; "models" is empty when it is this state's.
    best: dict = field(default_factory=dict)
    exported: dict = field(default_factory=dict)  # {"spec", "state_dict"}: the model to register
    mlflow_run_id: str = ""

    def save(self, directory: str | Path) -> None:
        # Write-then-rename: a crash mid-save never leaves a truncated state.pt behind.
        partial = os.path.join(directory, STATE_FILE + ".partial")
        torch.save(vars(self), partial)
        os.replace(partial, os.path.join(directory, STATE_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "LoopState":
        return cls(**read_checkpoint(directory))


def read_checkpoint(directory: str | Path) -> dict:
    """The state a checkpoint directory holds, as `LoopState.save` wrote it: a plain dict, so a
    reader that wants one part of it does not depend on every field of this version's LoopState."""
    # weights_only: a checkpoint is data, never code.
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def read_exported(directory: str | Path) -> dict:
    """The model a checkpoint holds for registration, `{"spec", "state_dict"}`; empty for a
    checkpoint from before the final stage."""
    return read_checkpoint(directory).get("exported") or {}


def rng_state() -> dict:
    """Every RNG `seed_everything` seeds (a method may draw from any of them), as tensors and
    lists: the checkpoint loads with weights_only."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "numpy" in state:      # (checkpoints written before it was saved resume without it)
        keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage_index * 10_007 + epoch) % 2**63


# ----------------------------------------------------------------------------------------------
# Data


def load_bundle(cfg: RunConfig, info: DatasetInfo, splits: list[str], shared: SharedSplits | None = None) -> DataBundle:
    """Every held split (`memory_splits`: with `data.loader=stream` Ray Data streams train) and
    every table, as tensors that view the arrays without a copy. In a Ray Train worker the arrays
    come from `shared`: read-only views of the node's object store, one copy per node however
    many workers read it (methodlab.data.shared). Without Ray (tests, benchmarks) they are read
    from Parquet here and are Arrow's buffers as they are."""
    if shared is None:
        split_arrays = lambda s: read_split(info, s, limit_rows=limit_rows(cfg, s))  # noqa: E731
        table_arrays = lambda t: read_table(info, t)  # noqa: E731
    else:
        split_arrays, table_arrays = shared.split, shared.table
    return DataBundle(info=info,
                      splits={s: SplitData(read_only_tensors(split_arrays(s)), column_decoders(info.columns, cfg.data.normalize))
                              for s in memory_splits(cfg, splits)},
                      tables={t: read_only_tensors(table_arrays(t)) for t in info.tables}, normalize=cfg.data.normalize)


def read_only_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors viewing `arrays` ({column: [rows, ...]}), read-only memory included. torch warns
    that it cannot enforce read-only; it is deliberate: a writable copy per worker is what the
    memory loader exists to avoid, and nothing writes into a split (batches are gathered copies,
    `minibatches`; a method that changes a split replaces its tensors, e.g. D3GZSL's scaling)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def shard_indices(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """DistributedSampler semantics: a seeded permutation, padded so every rank gets the same count."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world) * world
    perm = torch.cat([perm, perm[: total - n]])
    return perm[rank:total:world]


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Batches of one rank's epoch over `rows` rows (`minibatches`: a trailing one-row batch is
    dropped); at least 1, so a scheduler's length is never 0."""
    full, rest = divmod(rows, batch_size)
    return max(1, full + (1 if rest > 1 or (rest == 1 and full == 0) else 0))


def steps_per_epoch(n_rows: int, world: int, batch_size: int) -> int:
    """Batches per epoch and rank of `memory_batches` (shards padded to ceil(n_rows / world))."""
    return batches_per_epoch(math.ceil(n_rows / world), batch_size)


def stream_steps_per_epoch(n_rows: int, world: int, batch_size: int) -> int:
    """Batches per epoch and rank of the stream loader: Ray Train splits a stream into equal
    shards of n_rows // world rows (the remainder is left out), batched as `minibatches` does."""
    return batches_per_epoch(n_rows // world, batch_size)


def minibatches(tensors: dict[str, torch.Tensor], order: torch.Tensor, bs: int,
                device: torch.device, skip: int = 0) -> Iterator[Batch]:
    """Batches of `bs` rows of `tensors`, taken in `order`, on `device`; the first `skip` batches
    are left out (a resumed epoch)."""
    pin = device.type == "cuda"
    # A trailing batch of one row is dropped: BatchNorm cannot train on it. Its row comes back
    # in another position next epoch (the order is reseeded per epoch).
    stop = len(order) - 1 if len(order) % bs == 1 and len(order) > 1 else len(order)
    for start in range(skip * bs, stop, bs):
        rows = order[start:start + bs]
        batch = {k: v[rows] for k, v in tensors.items()}
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def chunk_minibatches(chunks: Iterator[dict[str, np.ndarray]], bs: int, device: torch.device) -> Iterator[Batch]:
    """Minibatches of `bs` rows, in order, of Ray Data's numpy chunks ({column: [rows, ...]} in
    the stored dtypes; already shuffled by Ray Data), pinned and on `device`. Ray hands over
    chunks of a multiple of `bs` rows but the last, so only the epoch's trailing one-row batch is
    dropped, as `minibatches` does."""
    for chunk in chunks:
        tensors = {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in chunk.items()}
        rows = len(next(iter(tensors.values())))
        yield from minibatches(tensors, torch.arange(rows), bs, device)


@dataclass
class Stream:
    """data.loader=stream, as the loop sees it (the Ray side is `train.loop`): `rows[source]`,
    the rows of each streamed source (`Method.train_source`) over all ranks, and
    `batches(source, seed, skip)`, one epoch of this rank's shard of it in an order that is a
    function of `seed`, its first `skip` batches left out."""

    rows: dict[str, int]
    batches: Callable[[str, int, int], Iterator[Batch]]


def memory_batches(cfg: RunConfig, split: SplitData, seed: int, rank: int, world: int,
                   device: torch.device, skip: int = 0) -> Iterator[Batch]:
    """One epoch of rank `rank`'s minibatches of an in-memory split (a method's `train_split`)."""
    idx = shard_indices(len(split), rank, world, seed)
    yield from minibatches(split.tensors, idx, cfg.train.batch_size, device, skip)


# ----------------------------------------------------------------------------------------------
# Devices and models


def autocast_factory(cfg: RunConfig, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to its device; on a GPU, a convolutional model goes channels-last (NHWC),
    the layout cuDNN's tensor-core convolutions run natively (bench/gpu_path.py measures it).
    Inputs stay NCHW: the first convolution converts them."""
    if device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def ddp_wrap(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool) -> torch.nn.Module:
    """Plain torch DDP (what the Ray adapter's `prepare_model` does too)."""
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     find_unused_parameters=find_unused_parameters)


def cpu_state(module: torch.nn.Module | Any) -> dict:
    """A state dict copied off the device (a snapshot later steps cannot change)."""
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
            for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Metrics without per-step syncs


class LossMeter:
    """Per-term loss sums kept on the device between reads; `read` all-reduces them (plus any
    extra per-rank values, e.g. rank 0's "a checkpoint is due") in one collective and one host
    copy. Totals of the epoch so far are kept on the host as global sums."""

    def __init__(self, device: torch.device, world: int):
        self.device, self.world = device, world
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_counts: dict[str, int] = {}
        self.pending_from = None
        self.sums: dict[str, float] = {}      # global sums, finished reads of this epoch
        self.counts: dict[str, int] = {}      # global counts (steps x ranks)

    def add(self, losses: dict[str, torch.Tensor], step: int) -> None:
        if self.pending_from is None:
            self.pending_from = step
        for k, v in losses.items():
            v = v.detach().to(self.device, torch.float32, non_blocking=True).reshape(())
            self.pending[k] = self.pending[k] + v if k in self.pending else v
            self.pending_counts[k] = self.pending_counts.get(k, 0) + 1

    def read(self, last_step: int, where: str, extra: list[float] = ()) -> tuple[dict[str, float], list[float]]:
        """The interval's global means (and the summed `extra`); raises FloatingPointError naming
        the first non-finite term and the step range when any rank's loss was NaN or inf."""
        keys = sorted(self.pending)
        values = [self.pending[k] for k in keys] + [torch.tensor(float(x), device=self.device) for x in extra]
        if not values:
            return {}, []
        summed = distributed.all_sum(torch.stack(values)).cpu().tolist()   # the one host sync
        interval = {}
        for k, total in zip(keys, summed):
            count = self.pending_counts[k] * self.world
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"non-finite loss {k}={total} in steps {self.pending_from}-{last_step} ({where}); "
                    "lower train.lr or check the data")
            interval[k] = total / count
            self.sums[k] = self.sums.get(k, 0.0) + total
            self.counts[k] = self.counts.get(k, 0) + count
        self.pending, self.pending_counts, self.pending_from = {}, {}, None
        return interval, summed[len(keys):]

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def restore(self, state: dict) -> None:
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))


class PhaseTimer:
    """Host wall-clock seconds per phase of an epoch (no device syncs: on a GPU, `step` is the
    time to enqueue the work, and the wait shows up where the host next blocks)."""

    PHASES = ("data", "step", "eval", "checkpoint_build", "checkpoint_save", "report", "mlflow")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in self.seconds.items()}


# ----------------------------------------------------------------------------------------------
# Hooks


@dataclass
class Checkpoint:
    """What the loop hands the hooks when a checkpoint is due; `build()` makes the state (on the
    rank that saves it), so epochs without a checkpoint never pay for it."""

    build: Callable[[], LoopState]
    mid_epoch: bool
    score: float | None            # the method's metric of this checkpoint's model (higher = better)


class Hooks:
    """Events of the loop (Composer-style); the defaults do nothing. Every rank gets every call,
    but `on_progress`: only a rank whose hooks set `progress_every_s` gets it."""

    progress_every_s: float | None = None     # wall-clock seconds between on_progress calls (None: never)

    def on_progress(self, state: LoopState, stage: str, done: int, total: int, rate: float,
                    losses: dict[str, float]) -> None:
        """Within an epoch, every `progress_every_s`: `done` of its `total` batches, at `rate`
        batches/s this attempt, `losses` as of the loop's last read (no read of its own)."""

    def on_epoch_params(self, stage: str, params: dict[str, Any]) -> None: ...

    def on_step(self, state: LoopState) -> None:
        """Before each step: where tests inject faults."""

    def corrupt_losses(self, state: LoopState, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return losses

    def on_epoch_end(self, state: LoopState, report: dict[str, Any], checkpoint: Checkpoint | None,
                     timer: PhaseTimer) -> None:
        """After each epoch (and at a mid-epoch checkpoint, with `report` holding no epoch)."""

    def on_epoch_artifacts(self, stage: str, epoch: int, artifacts: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------------
# The loop


BatchesFn = Callable[[SplitData | None, int, int], Iterator[Batch]]   # (split, seed, skip)


class Loop:
    """Runs a method's stages on one rank. `batches(split, seed, skip)` yields this rank's batches
    of an epoch of an in-memory split (default: the memory loader); with `stream` the loop trains
    on streamed sources instead. `wrap(model)` makes a trainable model data-parallel (default:
    torch DDP when a process group with more than one rank exists)."""

    def __init__(self, cfg: RunConfig, method: Method, device: torch.device, hooks: Hooks | None = None,
                 batches: BatchesFn | None = None, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 clock: Callable[[], float] = time.monotonic, started_at: float | None = None,
                 stream: Stream | None = None):
        self.cfg, self.method, self.device = cfg, method, device
        self.rank, self.world = distributed.world()
        self.hooks = hooks or Hooks()
        self.batches = batches or (lambda split, seed, skip: memory_batches(
            cfg, split, seed, self.rank, self.world, device, skip))
        self.stream = stream
        self.wrap = wrap or (lambda m: ddp_wrap(m, device, method.find_unused_parameters))
        self.autocast = autocast_factory(cfg, device)
        self.clock = clock
        self.last_checkpoint = clock()
        self.started_at = started_at                # time.time() of the command: start-up is measured
        self.first_step_at: float | None = None     # time.time() of this attempt's first step
        self.resume_rng: dict | None = None         # this rank's RNG state, restored before its next step

    # -- models ---------------------------------------------------------------------------------

    def sync_batchnorm(self, model: torch.nn.Module) -> bool:
        return self.cfg.scaling.sync_batchnorm and self.world > 1 and distributed.has_batchnorm(model)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        place_model(model, self.device)
        if not trainable(model) or self.world == 1:
            return model
        if self.sync_batchnorm(model):
            model = distributed.convert_batchnorm(model, self.device)
        return self.wrap(model)

    # -- the run ----------------------------------------------------------------------------------

    def fit(self, state: LoopState) -> dict[str, torch.nn.Module]:
        """Run (or resume at `state`) every stage; returns the final stage's models, unwrapped."""
        if len(state.rng) == self.world:
            self.resume_rng = state.rng[self.rank]
        elif state.rng and state.batch > 0:
            # Checkpointed mid-epoch on another worker count: the batches it skipped were another
            # partition of the epoch, so the epoch starts over (its sums so far dropped).
            state.batch, state.epoch_losses = 0, {}
        if state.best and state.best.get("models") is None:
            state.best["models"] = state.models        # the best epoch is the checkpoint's own
        models: dict[str, torch.nn.Module] = {}
        for stage_index in range(len(self.method.stages)):
            models = self.run_stage(state, stage_index, models)
        return models

    def run_stage(self, state: LoopState, stage_index: int, previous: dict) -> dict[str, torch.nn.Module]:
        """One stage from `state` (its models built from the stage before's, `previous`); a stage
        finished before a resume only rebuilds its models. Returns them, unwrapped."""
        method = self.method
        stage = method.stages[stage_index]
        raw = method.build_models(stage, previous=previous)
        in_this_stage = state.models_stage == stage_index and bool(state.models)
        if in_this_stage:
            for name, m in raw.items():
                m.load_state_dict(state.models[name])
        if stage_index < state.stage_index or state.complete:
            return raw
        models = {name: self.prepare(m) for name, m in raw.items()}
        optimizers = method.build_optimizers(stage, models)
        batches, per_epoch = self.epoch_batches(stage)
        schedulers = method.build_schedulers(stage, optimizers, per_epoch)
        if in_this_stage and (state.epoch > 0 or state.batch > 0):
            for name, o in optimizers.items():
                o.load_state_dict(state.optimizers[name])
            for name, s in schedulers.items():
                s.load_state_dict(state.schedulers[name])
        epochs = method.stage_epochs(stage)
        if epochs == 0 and stage_index < len(method.stages) - 1:
            state.stage_index, state.epoch, state.batch = stage_index + 1, 0, 0   # skipped: done
        for epoch in range(state.epoch if stage_index == state.stage_index else 0, epochs):
            self.run_epoch(state, stage_index, epoch, models, optimizers, schedulers, batches, per_epoch)
        return {k: distributed.unwrap(m) for k, m in models.items()}

    def epoch_batches(self, stage: str) -> tuple[Callable[[int, int], Iterator[Batch]], int]:
        """`stage`'s epochs, (seed, skip) -> this rank's batches, and the batches per epoch.
        Batches arrive as stored (uint8 images) and are decoded here, on the device."""
        bs = self.cfg.train.batch_size
        source = self.method.train_source(self.cfg, stage)
        decoders = self.method.data.decoders(source)
        if self.stream is None:
            split = self.method.train_split(stage)
            per_epoch = steps_per_epoch(len(split) if split is not None else 0, self.world, bs)
            stored = lambda seed, skip: self.batches(split, seed, skip)  # noqa: E731
        else:
            per_epoch = stream_steps_per_epoch(self.stream.rows[source], self.world, bs)
            stored = lambda seed, skip: self.stream.batches(source, seed, skip)  # noqa: E731
        return (lambda seed, skip: (decode_batch(b, decoders) for b in stored(seed, skip))), per_epoch

    def run_epoch(self, state: LoopState, stage_index: int, epoch: int, models: dict, optimizers: dict,
                  schedulers: dict, epoch_batches: Callable[[int, int], Iterator[Batch]], per_epoch: int = 0) -> None:
        cfg, method, timer = self.cfg, self.method, PhaseTimer()
        stage = method.stages[stage_index]
        epochs = method.stage_epochs(stage)
        t0 = time.perf_counter()
        ctx = StepContext(stage=stage, epoch=epoch, step=state.step, device=self.device, rank=self.rank,
                          world_size=self.world, autocast=self.autocast, extra={"schedulers": schedulers})
        if self.resume_rng is not None and state.batch == 0:
            set_rng_state(self.resume_rng)           # resumed at an epoch boundary
            self.resume_rng = None
        params = method.on_epoch_start(stage, models, ctx)
        if params:
            self.hooks.on_epoch_params(stage, params)
        for m in models.values():
            if trainable(distributed.unwrap(m)):
                m.train()
        meter = LossMeter(self.device, self.world)
        if state.batch > 0:                          # resumed mid-epoch: the sums so far
            meter.restore(state.epoch_losses)
        where = f"stage {stage}, epoch {epoch + 1}"
        every_steps = cfg.train.checkpoint_every_steps
        batches = epoch_batches(epoch_seed(cfg.train.seed, stage_index, epoch), state.batch)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)           # resumed mid-epoch: after on_epoch_start, as it ran
            self.resume_rng = None
        every_s = self.hooks.progress_every_s
        progress = ProgressClock(every_s, self.clock) if every_s else None
        first_batch, losses_read = state.batch, {}
        while True:
            with timer("data"):
                batch = next(batches, None)
            if batch is None:
                break
            self.hooks.on_step(state)
            with timer("step"):
                ctx.step = state.step
                losses = self.hooks.corrupt_losses(state, method.train_step(stage, models, optimizers, batch, ctx))
                meter.add(losses, state.step)
            if self.first_step_at is None:
                self.first_step_at = time.time()
            state.step += 1
            state.batch += 1
            by_steps = bool(every_steps) and state.step % every_steps == 0
            if by_steps or state.step % cfg.train.log_every_steps == 0:
                losses_read, (due,) = meter.read(state.step - 1, where, [self.time_due()])
                if by_steps or due:
                    self.checkpoint_mid_epoch(state, stage_index, epoch, models, optimizers, schedulers,
                                              meter, timer)
            if progress is not None and progress.due():
                self.hooks.on_progress(state, stage, state.batch, per_epoch,
                                       (state.batch - first_batch) / max(time.perf_counter() - t0, 1e-9), losses_read)

        # -- end of the epoch ---------------------------------------------------------------
        _, (time_due,) = meter.read(state.step - 1, where, [self.time_due()])
        last_stage = stage_index == len(method.stages) - 1
        stage_end = epoch == epochs - 1
        done = last_stage and stage_end
        metrics: dict[str, Any] = {f"train_{k}": v for k, v in meter.means().items()}
        evaluate = stage_end or (epoch + 1) % cfg.train.eval_every == 0
        if evaluate:
            with timer("eval"):
                val = self.evaluate(stage, models, "val")
            metrics.update(val)
            state.evaluated = dict(val)
        unwrapped = {k: distributed.unwrap(m) for k, m in models.items()}
        state.epoch, state.batch = epoch + 1, 0
        state.epoch_losses = {}
        state.history_step += 1
        if stage_end and not last_stage:
            state.stage_index, state.epoch = stage_index + 1, 0
        state.complete = done
        if last_stage and evaluate:
            self.track_best(state, metrics, unwrapped)
        final_models = None
        if done:
            final_models = {k: cpu_state(m) for k, m in unwrapped.items()} if self.rank == 0 else None
            if cfg.tracking.register == "best" and state.best.get("models"):
                for name, m in unwrapped.items():      # the registered model is the best epoch's
                    m.load_state_dict(state.best["models"][name])
            with timer("eval"):
                metrics.update(self.evaluate(stage, models, "test"))
        metrics["epoch_seconds"] = time.perf_counter() - t0
        if self.started_at is not None and self.first_step_at is not None:
            metrics["startup_s"] = self.first_step_at - self.started_at     # once: the attempt's first epoch
            self.started_at = None
        state.metrics = {k: float(v) for k, v in metrics.items()}
        state.metrics_stage = stage
        every = cfg.train.checkpoint_every
        due = stage_end or (every > 0 and state.history_step % every == 0) or time_due > 0
        checkpoint = None
        if due:
            checkpoint = Checkpoint(
                build=lambda: self.build_state(state, stage_index, unwrapped, optimizers, schedulers,
                                               final_models, mid_epoch=False),
                mid_epoch=False, score=self.score(metrics) if last_stage and evaluate else None)
            self.last_checkpoint = self.clock()
        report = {**state.metrics, "stage": stage, "epoch": state.history_step,
                  **({FINAL_STAGE_EPOCH: epoch + 1} if last_stage else {})}
        self.hooks.on_epoch_end(state, report, checkpoint, timer)
        if self.rank == 0:       # charts are built where they are logged (no collective in them)
            self.hooks.on_epoch_artifacts(stage, epoch, method.epoch_artifacts(stage, epoch))

    # -- evaluation and the best epoch -----------------------------------------------------------

    def evaluate(self, stage: str, models: dict, split: str) -> dict[str, float]:
        """Every rank evaluates its shard; the method's reductions make the result global."""
        unwrapped = {k: distributed.unwrap(m) for k, m in models.items()}
        distributed.broadcast_buffers(unwrapped)
        return self.method.evaluate(stage, unwrapped, split, self.device)

    def score(self, metrics: dict) -> float | None:
        value = metrics.get(self.method.metric)
        if value is None or not math.isfinite(value):
            return None
        return value if self.method.mode == "max" else -value

    def track_best(self, state: LoopState, metrics: dict, models: dict) -> None:
        """Keep a host copy of the final stage's models at its best evaluated epoch, when that
        is what gets registered (every rank holds the same models, so every rank keeps the same
        copy; it is copied only when a new best appears)."""
        score = self.score(metrics)
        if score is None or (state.best and score <= state.best["score"]):
            return
        keep = self.cfg.tracking.register == "best"
        state.best = {"score": score, "history_step": state.history_step,
                      "metrics": {k: float(v) for k, v in metrics.items() if k.startswith("val_")},
                      "models": {k: cpu_state(m) for k, m in models.items()} if keep else {}}

    # -- checkpoints ------------------------------------------------------------------------------

    def time_due(self) -> float:
        """1.0 on rank 0 when `train.checkpoint_every_s` has passed (rank 0's clock decides for all)."""
        every = self.cfg.train.checkpoint_every_s
        return float(self.rank == 0 and every is not None and self.clock() - self.last_checkpoint >= every)

    def checkpoint_mid_epoch(self, state: LoopState, stage_index: int, epoch: int, models: dict,
                             optimizers: dict, schedulers: dict, meter: LossMeter, timer: PhaseTimer) -> None:
        state.epoch_losses = meter.state()
        unwrapped = {k: distributed.unwrap(m) for k, m in models.items()}
        checkpoint = Checkpoint(build=lambda: self.build_state(state, stage_index, unwrapped, optimizers,
                                                               schedulers, None, mid_epoch=True),
                                mid_epoch=True, score=None)
        self.last_checkpoint = self.clock()
        stage = self.method.stages[stage_index]
        report = {"stage": stage, "epoch": state.history_step, "step": state.step, **state.evaluated,
                  **({FINAL_STAGE_EPOCH: epoch} if stage_index == len(self.method.stages) - 1 else {})}
        self.hooks.on_epoch_end(state, report, checkpoint, timer)

    def build_state(self, state: LoopState, stage_index: int, models: dict, optimizers: dict, schedulers: dict,
                    final_models: dict | None, mid_epoch: bool) -> LoopState:
        """The checkpoint's state. Collective (the RNG states of all ranks), so every rank calls
        it; it returns a full state on rank 0 only."""
        rngs = distributed.all_objects(rng_state())
        if self.rank != 0:
            return state
        out = LoopState(**vars(state))
        out.rng = rngs
        out.method = self.method.state_dict()
        out.models = final_models or {k: cpu_state(m) for k, m in models.items()}
        out.models_stage = stage_index
        out.optimizers = {k: cpu_state(o) for k, o in optimizers.items()}
        out.schedulers = {k: s.state_dict() for k, s in schedulers.items()}
        if stage_index == len(self.method.stages) - 1:
            # Export builds modules (their init draws random numbers): on a forked RNG, so taking
            # a checkpoint never changes what is trained.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                model, spec = self.method.export(models)
            # (A global BatchNorm keeps BatchNorm's state-dict keys: the spec rebuilds a plain model.)
            out.exported = {"spec": spec, "state_dict": cpu_state(model)}
        if out.best.get("models") and out.best["history_step"] == out.history_step and not mid_epoch:
            out.best = {**out.best, "models": None}    # the best is this checkpoint's own models
        return out
