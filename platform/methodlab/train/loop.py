"""The shared worker loop: runs on every Ray Train worker, for every method.

It owns epochs, device placement, DDP wrapping, checkpoints, resume, metrics and MLflow; the
method owns its models and its step. The few Ray-specific lines are marked `# [ray]`.

Resume is exact: a checkpoint (written by rank 0 every epoch) holds the models, optimizers,
schedulers, the method's own state, every rank's RNG state, the stage/epoch/step counters and the
MLflow run id; the data order of an epoch is a pure function of (seed, stage, epoch). A run resumed
after epoch k therefore ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

import ray.train  # [ray]
import ray.train.torch  # [ray]

from methodlab import storage
from methodlab.config import RunConfig, from_dict
from methodlab.data.dataset import DatasetInfo, open_dataset, read_split, read_table
from methodlab.methods.base import Batch, DataBundle, Method, SplitData, StepContext, trainable
from methodlab.registry import get_method

STATE_FILE = "state.pt"


# ----------------------------------------------------------------------------------------------
# Checkpoint state


@dataclass
class LoopState:
    stage_index: int = 0
    epoch: int = 0                # next epoch to run within the stage
    step: int = 0                 # optimizer steps so far (all stages)
    history_step: int = 0         # epochs so far (all stages): the MLflow step of the next epoch
    complete: bool = False
    models_stage: int = 0         # the stage whose models `models` holds (a stage boundary: the last)
    models: dict = field(default_factory=dict)
    optimizers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    rng: list = field(default_factory=list)       # one entry per rank
    metrics: dict = field(default_factory=dict)   # the last epoch's metrics
    exported: dict = field(default_factory=dict)  # {"spec", "state_dict"}: the model as `export` gives it
    mlflow_run_id: str = ""

    def save(self, directory: str | Path) -> None:
        # Write-then-rename: a crash mid-save never leaves a truncated state.pt behind.
        partial = os.path.join(directory, STATE_FILE + ".partial")
        torch.save(vars(self), partial)
        os.replace(partial, os.path.join(directory, STATE_FILE))

    @classmethod
    def load(cls, directory: str) -> "LoopState":
        # weights_only: a checkpoint is data, never code.
        return cls(**torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True))


class CheckpointUploadError(RuntimeError):
    """Storage refused a checkpoint after its retries; the local copy is named in the message."""


def local_fallback_dir(cfg: RunConfig) -> Path | None:
    """Where rank 0 keeps the latest checkpoint of a run whose checkpoints go to S3 (None when
    storage.path is local: the checkpoint is already on disk)."""
    if not storage.is_s3(cfg.storage.path):
        return None
    return Path(cfg.storage.local_fallback) / cfg.run_name


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
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


def load_bundle(cfg: RunConfig, info: DatasetInfo, splits: list[str]) -> DataBundle:
    """Every split whole in memory, read straight from Parquet (local or S3) and converted to
    tensors without copies; with `data.loader=stream` the train split is streamed by Ray Data."""
    tensors = {}
    for split in splits:
        if split == "train" and cfg.data.loader == "stream":
            continue
        limit = cfg.data.limit_rows if split == "train" else None
        arrays = read_split(info, split, limit_rows=limit)
        # Arrow's zero-copy views are read-only; torch wants writable memory (copied only if needed).
        tensors[split] = SplitData({k: torch.from_numpy(np.require(v, requirements=["C", "W"]))
                                    for k, v in arrays.items()})
    tables = {t: {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in read_table(info, t).items()}
              for t in info.tables}
    return DataBundle(info=info, splits=tensors, tables=tables)


def shard_indices(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """DistributedSampler semantics: a seeded permutation, padded so every rank gets the same count."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    total = math.ceil(n / world) * world
    perm = torch.cat([perm, perm[: total - n]])
    return perm[rank:total:world]


# Ray Data hands the stream over in chunks of this many batches; the minibatches are cut and
# shuffled in torch by the same code as the memory loader's (minibatches below).
STREAM_CHUNK_BATCHES = 32


def epoch_batches(cfg: RunConfig, split: SplitData | None, seed: int, rank: int, world: int,
                  device: torch.device) -> Iterator[Batch]:
    """One epoch of rank `rank`'s minibatches: of `split` (a method's `train_split`) with the
    memory loader, of the dataset's streamed train split with the stream loader."""
    bs = cfg.train.batch_size
    if cfg.data.loader == "stream":
        shard = ray.train.get_dataset_shard("train")  # [ray]
        chunks = shard.iter_batches(batch_size=STREAM_CHUNK_BATCHES * bs, batch_format="numpy",  # [ray]
                                    prefetch_batches=2)
        yield from chunk_minibatches(chunks, bs, device, torch.Generator().manual_seed(seed))
        return
    idx = shard_indices(len(split), rank, world, seed)
    yield from minibatches(split.tensors, idx, bs, device)


def chunk_minibatches(chunks: Iterator[dict[str, np.ndarray]], bs: int, device: torch.device,
                      order: torch.Generator) -> Iterator[Batch]:
    """Minibatches of Ray Data's numpy chunks ({column: view of the Arrow buffers, [rows, ...]}),
    shuffled within each chunk, as Ray's local shuffle buffer would, but in one randperm."""
    for chunk in chunks:
        tensors = {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in chunk.items()}
        rows = len(next(iter(tensors.values())))
        yield from minibatches(tensors, torch.randperm(rows, generator=order), bs, device)


def minibatches(tensors: dict[str, torch.Tensor], order: torch.Tensor, bs: int,
                device: torch.device) -> Iterator[Batch]:
    """Batches of `bs` rows of `tensors`, taken in `order`, on `device`."""
    pin = device.type == "cuda"
    # A trailing batch of one row is dropped: BatchNorm cannot train on it. Its row comes back
    # in another position next epoch (the order is reseeded per epoch).
    stop = len(order) - 1 if len(order) % bs == 1 and len(order) > 1 else len(order)
    for start in range(0, stop, bs):
        rows = order[start:start + bs]
        batch = {k: v[rows] for k, v in tensors.items()}
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The loop


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def check_finite(losses: dict[str, torch.Tensor], step: int, stage: str, epoch: int) -> None:
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if not bool(torch.isfinite(values).all()):
        bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
        term, value = next(iter(bad.items()))
        raise FloatingPointError(f"non-finite loss {term}={value} at step {step} "
                                 f"(stage {stage}, epoch {epoch + 1}); lower train.lr or check the data")


def _crash_marker(run_id: str, epoch: int) -> Path:
    return Path(tempfile.gettempdir()) / f"methodlab-crash-{run_id}-{epoch}"


def _quiet_ray_report_log() -> None:
    """Ray Train logs every `report()` at INFO, from each worker, with the whole metrics dict;
    rank 0's epoch line says the same in one line. Ray names that logger after its module's file
    path, so it is looked up by the module's origin (and left alone if Ray moves the module)."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")  # [ray]
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker: `TorchTrainer(train_worker, train_loop_config=...)`."""
    _quiet_ray_report_log()
    cfg = from_dict(loop_config["config"])
    run_id = loop_config["mlflow_run_id"]
    storage.configure(cfg.storage)
    info = open_dataset(loop_config["dataset_uri"])
    context = ray.train.get_context()  # [ray]
    rank, world = context.get_world_rank(), context.get_world_size()  # [ray]
    device = ray.train.torch.get_device()  # [ray]
    seed_everything(cfg.train.seed + rank)

    data = load_bundle(cfg, info, loop_config["splits"])
    method: Method = get_method(cfg.method_name)(cfg, data)
    tracker = spool = None
    if rank == 0:
        from methodlab.config import methodlab_home
        from methodlab.tracking import MetricSpool, Tracker
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        spool = MetricSpool(tracker, run_id, methodlab_home() / "spool")

    restored = _restore(loop_config.get("recovered_checkpoint"))
    resumed = restored is not None
    state = restored or LoopState(mlflow_run_id=run_id)
    if resumed:
        method.load_state_dict(state.method)
        if len(state.rng) == world:
            set_rng_state(state.rng[rank])
        if rank == 0:
            _ensure_logged(spool, state)
            _best_effort(tracker.set_tags, run_id, {"methodlab.resumed_at_epoch": state.history_step})
            print(f"[{cfg.run_name}] resumed at stage {method.stages[state.stage_index]}, "
                  f"epoch {state.epoch + 1}, step {state.step}", flush=True)
    attempt_start_history = state.history_step

    autocast = autocast_factory(cfg, device)
    models: dict[str, torch.nn.Module] = {}
    for stage_index, stage in enumerate(method.stages):
        raw = method.build_models(stage, previous={k: unwrap(m) for k, m in models.items()})
        in_this_stage = resumed and state.models_stage == stage_index and bool(state.models)
        if in_this_stage:
            for name, m in raw.items():
                m.load_state_dict(state.models[name])
        if stage_index < state.stage_index:     # finished before the resume: its models only
            models = raw
            continue
        models = {}
        for name, m in raw.items():
            place_model(m, device)
            if trainable(m) and world > 1:
                models[name] = ray.train.torch.prepare_model(  # [ray] DDP wrap
                    m, move_to_device=False,
                    parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters})
            else:
                models[name] = m
        optimizers = method.build_optimizers(stage, models)
        split = method.train_split(stage)
        n_train = len(split) if split is not None else 0
        steps_per_epoch = max(1, math.ceil(math.ceil(n_train / world) / cfg.train.batch_size))
        schedulers = method.build_schedulers(stage, optimizers, steps_per_epoch)
        if in_this_stage and state.epoch > 0:
            for name, o in optimizers.items():
                o.load_state_dict(state.optimizers[name])
            for name, s in schedulers.items():
                s.load_state_dict(state.schedulers[name])
        start_epoch = state.epoch if stage_index == state.stage_index else 0
        epochs = method.stage_epochs(stage)
        if state.complete:
            break
        if epochs == 0 and stage_index == state.stage_index and stage_index < len(method.stages) - 1:
            state.stage_index, state.epoch = stage_index + 1, 0     # a skipped stage counts as done

        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            ctx = StepContext(stage=stage, epoch=epoch, step=state.step, device=device, rank=rank,
                              world_size=world, autocast=autocast, extra={"schedulers": schedulers})
            epoch_params = method.on_epoch_start(stage, models, ctx)
            if rank == 0 and epoch_params:
                _best_effort(tracker.log_params_once, run_id, {f"{stage}.{k}": v for k, v in epoch_params.items()})
            for m in models.values():
                if trainable(unwrap(m)):
                    m.train()
            sums: dict[str, float] = defaultdict(float)
            count = 0
            crash_now = (cfg.train.crash_after_epoch is not None and rank == world - 1
                         and state.history_step == cfg.train.crash_after_epoch
                         and attempt_start_history < cfg.train.crash_after_epoch
                         and not _crash_marker(run_id, state.history_step).exists())
            for batch in epoch_batches(cfg, split, epoch_seed(cfg.train.seed, stage_index, epoch), rank, world, device):
                if crash_now:   # fault injection: die hard mid-epoch, once
                    _crash_marker(run_id, state.history_step).touch()
                    time.sleep(1.0)   # let the controller register the last epoch's checkpoint
                    os._exit(1)
                ctx.step = state.step
                losses = method.train_step(stage, models, optimizers, batch, ctx)
                if cfg.train.nan_after_epoch is not None and state.history_step >= cfg.train.nan_after_epoch:
                    losses = {k: v * float("nan") for k, v in losses.items()}   # fault injection
                check_finite(losses, state.step, stage, epoch)
                for k, v in losses.items():
                    sums[k] += float(v)
                count += 1
                state.step += 1

            last_stage = stage_index == len(method.stages) - 1
            done = last_stage and epoch == epochs - 1
            metrics: dict[str, Any] = {f"train_{k}": v / max(count, 1) for k, v in sums.items()}
            unwrapped = {k: unwrap(m) for k, m in models.items()}
            if rank == 0:
                metrics.update(method.evaluate(stage, unwrapped, "val", device))
                if done:
                    metrics.update(method.evaluate(stage, unwrapped, "test", device))
            metrics["epoch_seconds"] = time.perf_counter() - t0

            state.epoch = epoch + 1
            state.history_step += 1
            if epoch + 1 == epochs and not last_stage:
                state.stage_index, state.epoch = stage_index + 1, 0
            state.complete = done
            state.method = method.state_dict()
            rngs = _gather_rng(world)
            if rank == 0:
                state.models = {k: m.state_dict() for k, m in unwrapped.items()}
                state.models_stage = stage_index
                if last_stage:
                    model, spec = method.export(unwrapped)
                    state.exported = {"spec": spec, "state_dict": model.state_dict()}
                state.optimizers = {k: o.state_dict() for k, o in optimizers.items()}
                state.schedulers = {k: s.state_dict() for k, s in schedulers.items()}
                state.rng = rngs
                state.metrics = {k: float(v) for k, v in metrics.items()}
            report = {**state.metrics, "stage": stage, "epoch": state.history_step} if rank == 0 else {}
            checkpoint_now = done or epoch + 1 == epochs or state.history_step % cfg.train.checkpoint_every == 0
            _report(report, state if rank == 0 and checkpoint_now else None, cfg)
            if rank == 0:
                _ensure_logged(spool, state)
                for file, obj in method.epoch_artifacts(stage, epoch).items():
                    _best_effort(tracker.log_object, run_id, obj, file)
                shown = " ".join(f"{k}={v:.4g}" for k, v in state.metrics.items() if k != "epoch_seconds")
                print(f"[{cfg.run_name}] {stage} epoch {epoch + 1}/{epochs} {shown} "
                      f"({metrics['epoch_seconds']:.1f}s)", flush=True)
        if state.complete:
            break

    if rank == 0:
        if not spool.flush():
            raise ConnectionError(f"MLflow at {cfg.tracking.uri} is still unreachable at the end of the run; "
                                  f"metrics are kept in {spool.path}: run `methodlab sync` when it is back, "
                                  "then submit the same run again to register the model")
        _register(cfg, method, {k: unwrap(m) for k, m in models.items()}, tracker, run_id, state)
        if (fallback := local_fallback_dir(cfg)) is not None:
            shutil.rmtree(fallback, ignore_errors=True)    # the run is done: its S3 copy is final


def _restore(recovered_uri: str | None) -> LoopState | None:
    """The newest of Ray's latest checkpoint and one recovered by `methodlab train ... resume`.
    Every rank reads the same files, so every rank takes the same one."""
    found = []
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            found.append(LoopState.load(d))
    if recovered_uri:
        with tempfile.TemporaryDirectory() as d:
            storage.download_dir(recovered_uri, d)
            found.append(LoopState.load(d))
    return max(found, key=lambda s: s.history_step, default=None)


def _gather_rng(world: int) -> list:
    mine = rng_state()
    if world == 1 or not dist.is_initialized():
        return [mine]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def _report(metrics: dict, state: LoopState | None, cfg: RunConfig) -> None:
    """Every rank reports; only rank 0 attaches the checkpoint, which Ray Train uploads to
    storage.path (pyarrow retries with backoff). With S3 storage the checkpoint is written to the
    local fallback directory first, so an S3 outage that outlasts the retries loses nothing. [ray]"""
    if state is None:
        ray.train.report(metrics, checkpoint=None)  # [ray]
        return
    fallback = local_fallback_dir(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        directory = fallback or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        state.save(directory)
        (directory / "config.yaml").write_text(cfg.to_yaml())
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))  # [ray]
        except OSError as e:
            if fallback is None:
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointUploadError(
                f"checkpoint upload to {cfg.storage.path.rstrip('/')}/{cfg.run_name} failed after retries "
                f"({reason}); epoch {state.history_step} is kept at {directory} on rank 0's node") from None


def _best_effort(fn, *args) -> None:
    """Tags, params and artifacts while the tracking server may be away: warn, keep training.
    (Metrics are never dropped: they go through the spool.)"""
    from methodlab.tracking import fail_fast

    for attempt in range(3):
        try:
            with fail_fast():
                fn(*args)
            return
        except Exception as e:  # noqa: BLE001 — MLflow raises several unrelated types when unreachable
            # A SQLite store shared by a sweep driver and its trials can be briefly locked: that
            # write is retried; an unreachable server is not (training must not wait for it).
            if "database is locked" in str(e) and attempt < 2:
                time.sleep(1.0 + attempt)
                continue
            print(f"[methodlab] MLflow write {fn.__name__} skipped: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
            return


def _ensure_logged(spool, state: LoopState) -> None:
    """Spool the epoch's metrics and write them to MLflow unless that step is already there (a
    resumed run never duplicates a step, even when it re-runs an epoch whose checkpoint was
    lost). A tracking server that is down delays the write; training goes on."""
    if state.metrics:
        spool.log({**state.metrics, "epoch": float(state.history_step), "step": float(state.step)},
                  state.history_step - 1)


def _register(cfg: RunConfig, method: Method, models: dict, tracker, run_id: str, state: LoopState) -> None:
    """Log the exported model and register a version (once per run, also across resumes)."""
    done = tracker.client.get_run(run_id).data.tags.get("methodlab.registered_version")
    if done is not None:
        return
    model, spec = method.export(models)
    final = {k: v for k, v in state.metrics.items() if k.startswith(("val_", "test_"))}
    from methodlab.tracking import git_commit
    version = tracker.log_model(run_id, model, spec, method.example_input(),
                                cfg.tracking.registered_model if cfg.tracking.register_model else None,
                                {**final, "git_commit": git_commit(), "run_name": cfg.run_name})
    tracker.set_tags(run_id, {"methodlab.registered_version": version or "none",
                              "methodlab.model_spec": json.dumps(spec)})
