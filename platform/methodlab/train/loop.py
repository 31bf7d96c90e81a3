"""The Ray Train worker: `TorchTrainer(train_worker, train_loop_config=...)` runs this on every
worker. It is a thin adapter around the Ray-free core (`methodlab.train.core.Loop`): Ray's
context and DDP wrap, `ray.train.report` with checkpoints, and MLflow. The Ray-specific lines are
marked `# [ray]`.

Rank 0 is never alone on the hot path: every rank trains, evaluates its shard and reports; rank 0
additionally saves the checkpoint (Ray uploads it in the background with
`train.checkpoint_upload=async`) and appends the epoch's metrics to its local spool file, which a
background thread sends to MLflow. At the end it waits until Ray has committed every checkpoint,
then registers the model.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs
import torch

import ray.train  # [ray]
import ray.train.torch  # [ray]

from methodlab import storage
from methodlab.config import RunConfig, from_dict, methodlab_home
from methodlab.console import progress_line, quiet_worker_logs
from methodlab.data.dataset import open_dataset
import methodlab.methods  # noqa: F401  (fills the registries in the Ray worker)
from methodlab.methods.base import Batch, Method
from methodlab.models import build_model
from methodlab.registry import get_method
from methodlab.spool import SpoolFile
from methodlab.train.core import (STATE_FILE, Checkpoint, Hooks, LoopState, Loop, PhaseTimer, Stream,
                                  chunk_minibatches, load_bundle, memory_batches, seed_everything)
from methodlab.train.checkpoints import MANIFEST_FILE, write_manifest
from methodlab.train.faults import Faults

SCORE_KEY = "checkpoint_score"   # the method's metric, higher = better: what Ray ranks checkpoints by


class CheckpointUploadError(RuntimeError):
    """Storage refused a checkpoint after its retries; the local copy is named in the message."""


def local_fallback_dir(cfg: RunConfig) -> Path | None:
    """Where rank 0 keeps the latest checkpoint of a run whose checkpoints go to S3 (None when
    storage.path is local: the checkpoint is already on disk)."""
    if not storage.is_s3(cfg.storage.path):
        return None
    return Path(cfg.storage.local_fallback) / cfg.run_name


# ----------------------------------------------------------------------------------------------
# Data


# Ray Data hands the stream over in chunks of this many batches (one Python hand-over per chunk,
# not per batch); the minibatches are cut in torch by the memory loader's code (core.minibatches).
STREAM_CHUNK_BATCHES = 32


def stream_batches(cfg: RunConfig, shard, seed: int, device: torch.device, skip: int) -> Iterator[Batch]:
    """One epoch of this worker's `shard` (a Ray DataIterator, `ray.train.get_dataset_shard`) of a
    streamed source (`data.loader=stream`), in the stored dtypes, pinned (CUDA) and on `device`,
    Ray Data prefetching 2 chunks in the background.

    The order: the dataset's seeded block order (`launch.stream_dataset`), then Ray Data's local
    shuffle buffer of `data.shuffle_buffer_rows` rows seeded by the epoch's `seed` (a function of
    train.seed, stage and epoch): a row leaves the buffer at a random time, so it moves about a
    buffer's length from its place in the block order; it is not a full permutation. The same
    seed gives the same order, so a resumed epoch skips the `skip` batches it had trained.
    (CPU-side decoding or augmentation belongs in a `map_batches` of the dataset, on Ray Data's
    CPUs; the device-side kind stays in the method's step.)"""
    bs = cfg.train.batch_size
    chunks = shard.iter_batches(  # [ray]
        batch_size=STREAM_CHUNK_BATCHES * bs, batch_format="numpy", prefetch_batches=2,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer_rows or None, local_shuffle_seed=seed % 2**32)
    yield from itertools.islice(chunk_minibatches(chunks, bs, device), skip, None)


def stream_pass(source: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """One unshuffled pass over this worker's shard of a streamed source, every row once (a
    method's evaluation over its train split, `Method.split_batches`); every rank must take it."""
    shard = ray.train.get_dataset_shard(source)  # [ray]
    for chunk in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):  # [ray]
        yield {k: torch.from_numpy(np.require(v, requirements=["C", "W"])).to(device, non_blocking=True)
               for k, v in chunk.items()}


# ----------------------------------------------------------------------------------------------
# The worker


def _quiet_ray_report_log() -> None:
    """Ray Train logs every `report()` and every persisted checkpoint at INFO, from each worker;
    rank 0's epoch line says the same in one line. Ray names the first logger after its module's
    file path (looked up by the module's origin, and left alone if Ray moves the module), the
    second after the module."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")  # [ray]
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)  # [ray]


def train_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    _quiet_ray_report_log()
    quiet_worker_logs()
    cfg = from_dict(loop_config["config"])
    run_id = loop_config["mlflow_run_id"]
    storage.configure(cfg.storage)
    info = open_dataset(loop_config["dataset_uri"])
    context = ray.train.get_context()  # [ray]
    rank = context.get_world_rank()  # [ray]
    device = ray.train.torch.get_device()  # [ray]
    seed_everything(cfg.train.seed + rank)

    data = load_bundle(cfg, info, loop_config["splits"], loop_config["shared"])  # [ray] object refs
    stream = None
    if cfg.data.loader == "stream":
        data.stream = stream_pass
        stream = Stream(rows=loop_config["stream_rows"],
                        batches=lambda source, seed, skip: stream_batches(
                            cfg, ray.train.get_dataset_shard(source), seed, device, skip))  # [ray]
    method: Method = get_method(cfg.method_name)(cfg, data)
    state = _restore(loop_config.get("recovered_checkpoint")) or LoopState(mlflow_run_id=run_id)
    hooks = RayHooks(cfg, method, run_id, rank, state, Faults.parse(loop_config.get("faults")),
                     loop_config.get("progress", "lines"))
    batches = lambda split, seed, skip: memory_batches(  # noqa: E731
        cfg, split, seed, rank, context.get_world_size(), device, skip)  # [ray]
    wrap = lambda m: ray.train.torch.prepare_model(  # noqa: E731  # [ray] DDP wrap
        m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": method.find_unused_parameters})
    loop = Loop(cfg, method, device, hooks=hooks, batches=batches, wrap=wrap, started_at=loop_config.get("launched_at"),
                stream=stream)
    fit_to_end(loop, state, hooks)


# [ray] Ray Train tears a worker group down (a signal to the driver, another worker's failure) by
# ray.kill on its workers and then on their SynchronizationActor, without waiting in between;
# the kills are messages, and the actor's death can reach a worker blocked in report() before
# its own kill does. That worker then fails with ActorDiedError, and Ray Train logs its
# traceback, which the driver's console shows after the one line the user was given (CI saw it
# after a SIGTERM). The worker's own kill follows within milliseconds; an actor that died on its
# own (its node lost) is still raised, this much later.
TEARDOWN_GRACE_S = 10.0


def fit_to_end(loop: Loop, state: LoopState, hooks: "RayHooks") -> None:
    """Train, then wait for the MLflow writes and finish the run (rank 0 registers the model).
    On a failure the writes in flight are waited for without raising theirs: the training error
    is the one to see; one from a Ray actor this worker waited on is raised TEARDOWN_GRACE_S later."""
    try:
        loop.fit(state)
    except ray.exceptions.RayActorError:  # [ray]
        hooks.close(check=False)
        time.sleep(TEARDOWN_GRACE_S)
        raise
    except BaseException:
        hooks.close(check=False)
        raise
    hooks.close()
    hooks.finish(state)


def _restore(recovered_uri: str | None) -> LoopState | None:
    """The newest of Ray's latest checkpoint and one recovered by `methodlab train ... resume`.
    Every rank reads the same files, so every rank takes the same one."""
    found = []
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint is not None:
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            with checkpoint.as_directory() as d:     # the directory itself: no copy  [ray]
                found.append(LoopState.load(d))
        else:
            # A private download per rank, not as_directory(): ranks on one node share its
            # download directory, and one that takes the lock after another has finished
            # downloads again over the files the other is reading (Ray 2.60
            # Checkpoint.to_directory); CI saw a resume read a half-rewritten state.pt.
            with tempfile.TemporaryDirectory() as d:
                found.append(LoopState.load(checkpoint.to_directory(d)))  # [ray]
    if recovered_uri:
        with tempfile.TemporaryDirectory() as d:
            storage.download_dir(recovered_uri, d)
            found.append(LoopState.load(d))
    return max(found, key=lambda s: (s.history_step, s.step), default=None)


class RayHooks(Hooks):
    """Report and checkpoint through Ray Train, metrics and artifacts to MLflow (rank 0)."""

    def __init__(self, cfg: RunConfig, method: Method, run_id: str, rank: int, state: LoopState, faults: Faults,
                 progress: str = "lines"):
        self.cfg, self.method, self.run_id, self.rank, self.faults = cfg, method, run_id, rank, faults
        # Progress within an epoch, on rank 0: a bar the driver draws (`launch.build_trainer` says
        # "bar" when its console is a terminal; tqdm_ray sends an update at most once a second),
        # else a line every train.log_every_s.
        self.progress, self.bar = progress, None
        if rank == 0:
            self.progress_every_s = 1.0 if progress == "bar" else cfg.train.log_every_s
        self.last_rank = rank == ray.train.get_context().get_world_size() - 1  # [ray]: where faults strike
        self.started_at = (state.history_step, state.step)
        self.saved: LoopState | None = state if state.complete else None   # the latest state rank 0 saved
        self.tracker = self.spool = self.writer = None
        self.mlflow_wait = 0.0      # seconds the loop spent handing work to MLflow, logged next epoch
        if rank != 0:
            return
        # One thread writes to MLflow in order, so a slow tracking server never stalls training.
        # It also opens the store (importing mlflow, a SQLite store's set-up: ~2 s), once the
        # first step has started: before it, that work would hold the GIL and the import lock
        # on the path to the first step (measured: the first step came 2 s later).
        self.stepped = threading.Event()
        self.writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self.jobs: list[concurrent.futures.Future] = []
        # Each epoch's line is appended here, on the training thread (a local file: durable if the
        # worker is killed with MLflow writes still queued); the writer thread sends it on.
        self.spool_file = SpoolFile(cfg.tracking.uri, run_id, methodlab_home() / "spool")
        self._mlflow(self._open_tracking)
        if state.history_step or state.step:
            if state.metrics:
                # The checkpoint's last epoch, again: a crash between its report and its spool
                # line would lose it otherwise (an epoch MLflow already has is not written twice).
                self.spool_file.append(*self._epoch_record(state, {}, method.stages))
            self._mlflow(lambda: self.spool.flush())
            resumed_at = state.history_step     # (the value now, not when written)
            self._mlflow(lambda: self._tag_resumed(resumed_at))
            print(f"[{cfg.run_name}] resumed at stage {method.stages[state.stage_index]}, "
                  f"epoch {state.epoch + 1}, step {state.step}", flush=True)

    def _open_tracking(self) -> None:
        self.stepped.wait()
        from methodlab.tracking import MetricSpool, Tracker

        self.tracker = Tracker(self.cfg.tracking.uri, self.cfg.tracking.experiment)
        self.spool = MetricSpool(self.tracker, self.run_id, methodlab_home() / "spool")

    def _tag_resumed(self, epoch: int) -> None:
        from methodlab.tracking import RESUMED_AT_EPOCH_TAG

        _best_effort(self.tracker.set_tags, self.run_id, {RESUMED_AT_EPOCH_TAG: epoch})

    def _mlflow(self, job) -> None:
        """Queue `job` (a no-argument callable) for the MLflow thread."""
        t0 = time.perf_counter()
        self.jobs = [j for j in self.jobs if not j.done() or j.exception() is not None]
        self.jobs.append(self.writer.submit(job))
        self.mlflow_wait += time.perf_counter() - t0

    # -- events ---------------------------------------------------------------------------------

    def on_epoch_params(self, stage: str, params: dict[str, Any]) -> None:
        if self.rank == 0:
            named = {f"{stage}.{k}": v for k, v in params.items()}
            self._mlflow(lambda: _best_effort(self.tracker.log_params_once, self.run_id, named))

    def on_progress(self, state: LoopState, stage: str, done: int, total: int, rate: float,
                    losses: dict[str, float]) -> None:
        epoch = state.history_step + 1            # (the epoch line's number, once it ends)
        if self.progress != "bar":
            print(progress_line(self.cfg.run_name, stage, epoch, done, total, rate, losses), flush=True)
            return
        if self.bar is None:
            from ray.experimental.tqdm_ray import tqdm  # [ray] drawn on the driver's terminal

            self.bar = tqdm(desc=f"[{self.cfg.run_name}] {stage} epoch {epoch}", total=total, unit="step")
        self.bar.update(done - self.bar.n)

    def on_step(self, state: LoopState) -> None:
        if self.rank == 0 and not self.stepped.is_set():
            self.stepped.set()
        if self.last_rank and self.faults.crash_due(state.history_step, state.step, self.started_at):
            self.faults.crash_once(self.run_id)

    def corrupt_losses(self, state: LoopState, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.faults.corrupt(state.history_step, losses)

    def on_epoch_end(self, state: LoopState, report: dict[str, Any], checkpoint: Checkpoint | None,
                     timer: PhaseTimer) -> None:
        directory = None
        if checkpoint is not None:
            with timer("checkpoint_build"):
                built = checkpoint.build()     # collective: every rank takes part
            if self.rank == 0:
                with timer("checkpoint_save"):
                    directory = self._save(built)
                self.saved = built
        metrics = {**report}
        if checkpoint is not None:
            # Unscored checkpoints (earlier stages, mid-epoch) rank last: kept only while latest.
            # (A missing key would rank them the same, with a warning from Ray each time.)
            metrics[SCORE_KEY] = float("-inf") if checkpoint.score is None else checkpoint.score
        with timer("report"):
            self._report({**state.evaluated, **metrics} if self.rank == 0 else {}, directory, state)
        if self.rank != 0 or (checkpoint is not None and checkpoint.mid_epoch):
            return
        if self.bar is not None:                # the epoch is done: its bar at 100%, then its line
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
        t0 = time.perf_counter()
        self.spool_file.append(*self._epoch_record(state, {**timer.metrics(), "time_mlflow_s": self.mlflow_wait},
                                                   self.method.stages))
        self.mlflow_wait = time.perf_counter() - t0
        self._mlflow(lambda: self.spool.flush())
        shown = " ".join(f"{k}={v:.4g}" for k, v in state.metrics.items()
                         if not k.startswith("time_") and k not in ("epoch_seconds", "startup_s"))
        # The attempt's first epoch also says how long the start took (Ray, the workers, the data):
        # on 2 CPUs most of the wait before it, and no line of its own.
        started = f"; first step {state.metrics['startup_s']:.0f}s after the start" if "startup_s" in state.metrics else ""
        print(f"[{self.cfg.run_name}] {report['stage']} epoch {state.history_step} {shown} "
              f"({state.metrics['epoch_seconds']:.1f}s{started})", flush=True)

    @staticmethod
    def _epoch_record(state: LoopState, extra: dict, stages: list[str]) -> tuple[dict, int, int]:
        """(metrics as MLflow names them, global optimizer step at its end, epoch) of the last
        finished epoch (a mid-epoch checkpoint's state is `state.batch` steps past that end).
        The step is the epoch's MLflow step (`tracking.flush_spool_file`), so `epoch` and `step`
        are not metrics of their own."""
        return (stage_metric_names({**state.metrics, **extra}, state.metrics_stage, stages),
                state.step - state.batch, state.history_step)

    def on_epoch_artifacts(self, stage: str, epoch: int, artifacts: dict[str, Any]) -> None:
        if self.rank == 0:
            for file, obj in artifacts.items():
                self._mlflow(lambda obj=obj, file=file: _best_effort(self.tracker.log_object, self.run_id, obj, file))

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self, state: LoopState) -> str:
        """The checkpoint in a fresh directory for Ray to upload (and delete). With S3 storage the
        same files also become the local fallback copy (hard links: written once), so an S3
        outage that outlasts the upload's retries loses nothing."""
        fallback = local_fallback_dir(self.cfg)
        if fallback is None:
            directory = Path(tempfile.mkdtemp(prefix=f"methodlab-{self.cfg.run_name}-"))
        else:
            uploads = fallback.parent / f".{fallback.name}.uploads"
            uploads.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(dir=uploads))
        state.save(directory)
        (directory / "config.yaml").write_text(self.cfg.to_yaml())
        write_manifest(directory)
        if fallback is not None:
            fallback.mkdir(parents=True, exist_ok=True)
            for name in (STATE_FILE, "config.yaml", MANIFEST_FILE):
                link = fallback / f".{name}.link"
                link.unlink(missing_ok=True)
                os.link(directory / name, link)
                os.replace(link, fallback / name)
        return str(directory)

    def _report(self, metrics: dict, directory: str | None, state: LoopState) -> None:
        """Every rank reports; rank 0 attaches the checkpoint. [ray]"""
        if directory is None:
            ray.train.report(metrics, checkpoint=None)  # [ray]
            return
        mode = ray.train.CheckpointUploadMode.ASYNC if self.cfg.train.checkpoint_upload == "async" \
            else ray.train.CheckpointUploadMode.SYNC  # [ray]
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),  # [ray]
                             checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)
        except OSError as e:     # a sync upload that failed after its retries
            fallback = local_fallback_dir(self.cfg)
            if fallback is None:
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointUploadError(
                f"checkpoint upload to {self.cfg.storage.path.rstrip('/')}/{self.cfg.run_name} failed after "
                f"retries ({reason}); epoch {state.history_step} is kept at {fallback} on rank 0's node") from None

    # -- the end of the run ----------------------------------------------------------------------

    def close(self, check: bool = True) -> None:
        """Wait for the MLflow writes in flight; with `check`, a write that raised (not one MLflow
        refused: those are best effort) is raised here."""
        if self.writer is not None:
            self.stepped.set()          # (a run that failed before its first step)
            self.writer.shutdown(wait=True)
            for job in self.jobs if check else ():
                job.result()

    def finish(self, state: LoopState) -> None:
        if self.rank != 0:
            return
        # Async uploads may still be in flight, and one that failed does not raise here: wait
        # until Ray has committed every checkpoint this rank reported. (After a failed upload
        # Ray fails the run and stops this worker while it waits, so nothing below runs: the
        # local fallback stays and no model is registered from a run that lost a checkpoint.)
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)  # [ray]
        if not self.spool.flush():
            raise ConnectionError(f"MLflow at {self.cfg.tracking.uri} is still unreachable at the end of the run; "
                                  f"metrics are kept in {self.spool.path}: run `methodlab sync` when it is back, "
                                  "then submit the same run again to register the model")
        _register(self.cfg, self.method, self.tracker, self.run_id, self.saved or state)
        if (fallback := local_fallback_dir(self.cfg)) is not None:
            shutil.rmtree(fallback, ignore_errors=True)    # the run is done: its S3 copy is final
            shutil.rmtree(fallback.parent / f".{fallback.name}.uploads", ignore_errors=True)


ATTEMPT_METRICS = {"startup_s"}     # an attempt's, not a stage's (core: its first epoch logs it)


def stage_metric_names(metrics: dict[str, float], stage: str, stages: list[str]) -> dict[str, float]:
    """The metrics of an epoch of `stage` as MLflow records them: a multi-stage method's stages
    but the last under `<stage>/` (MLflow's UI groups charts by the prefix before '/'), so TOAST's
    pretune reads as `pretune/val_acc`; the last stage keeps plain names, so the method's metric
    (what sweeps, registration and the report rank by) is the final stage's. (A state saved
    before it recorded its stage, `stage` empty, keeps plain names.)"""
    if not stage or stage == stages[-1]:
        return metrics
    return {k if k in ATTEMPT_METRICS else f"{stage}/{k}": v for k, v in metrics.items()}


def _best_effort(fn, *args) -> None:
    """Tags, params and artifacts while the tracking server may be away: warn, keep training.
    (Metrics are never dropped: they go through the spool.)"""
    from methodlab.tracking import fail_fast

    try:
        # (A locked SQLite store is retried by the Tracker's client; an unreachable server is
        # not: training must not wait for it.)
        with fail_fast():
            fn(*args)
    except Exception as e:  # noqa: BLE001 — MLflow raises several unrelated types when unreachable
        print(f"[methodlab] MLflow write {fn.__name__} skipped: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)


def _register(cfg: RunConfig, method: Method, tracker, run_id: str, state: LoopState) -> None:
    """Log the exported model of the final checkpoint (the best epoch's with
    `tracking.register=best`) and register a version (once per run, also across resumes)."""
    from methodlab.tracking import REGISTERED_VERSION_TAG

    if tracker.client.get_run(run_id).data.tags.get(REGISTERED_VERSION_TAG) is not None:
        return
    spec = state.exported["spec"]
    model = build_model(spec)
    model.load_state_dict(state.exported["state_dict"])
    chosen = state.best.get("metrics", {}) if cfg.tracking.register == "best" and state.best else \
        {k: v for k, v in state.metrics.items() if k.startswith("val_")}
    tests = {k: v for k, v in state.metrics.items() if k.startswith("test_")}
    epoch = state.best.get("history_step", state.history_step) if cfg.tracking.register == "best" else state.history_step
    tracker.register(run_id, model, spec, method.example_input(),
                     cfg.tracking.registered_model if cfg.tracking.register_model else None,
                     {**chosen, **tests, "epoch": epoch, "run_name": cfg.run_name},
                     method.export_input_doc(), epoch=epoch)
