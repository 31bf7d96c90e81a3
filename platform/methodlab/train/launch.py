"""The driver side of a run: preflight, the MLflow run, the Ray Train job, the summary.

Order matters: everything a user can get wrong (config, dataset, storage, tracking server,
cluster capacity) is checked before the TorchTrainer is created, so a bad input costs no cluster
resources and leaves no run behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import methodlab.methods  # noqa: F401  (fills the registries for library callers of train())
from methodlab import storage
from methodlab.config import RunConfig
from methodlab.console import configure_ray_logs, forwarded_env, library_log_level
from methodlab.data import DatasetInfo, resolve_dataset, split_nbytes
from methodlab.data.dataset import column_ranges, split_rows
from methodlab.data.shared import fmt_bytes, held_nbytes, memory_budget, memory_splits, put_splits
from methodlab.errors import ConfigError, DataError, ServiceError, TrainingError
from methodlab.redact import redact_value
from methodlab.registry import get_method
from methodlab.train import checkpoints
from methodlab.train.lease import Lease
from methodlab.train.signals import Interrupted, stop_on_signals

if TYPE_CHECKING:
    from methodlab.tracking import RunRecord, Tracker

# Ray's controller polls every worker every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s)
# and each report() may wait for that poll. methodlab reports once per epoch (and per mid-epoch
# checkpoint), so 1 s costs real epochs nothing; polling every 0.1 s cost a 2-worker epoch on
# 2 CPUs 0.5-0.9 s of 12 (bench/overhead.py), and grows with the number of workers. Tests and
# the demo, whose epochs take a fraction of a second, set 0.1 (Makefile).
RAY_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "RAY_USAGE_STATS_ENABLED": "0",
                    # Without the patch a worker print() shows once, not twice.
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


SPLITS = ["train", "val", "test"]      # the splits every run reads (train streamed with data.loader=stream)


@dataclass
class RunSummary:
    run_name: str
    run_id: str
    status: str
    metrics: dict[str, float]
    registered_model: str | None
    version: str | None
    resumed: bool = False
    already_finished: bool = False

    def line(self, metric: str) -> str:
        value = self.metrics.get(metric)
        shown = f"{metric}={value:.4f}" if value is not None else f"{metric}=n/a"
        model = f" · registered {self.registered_model} v{self.version} (alias candidate)" if self.version else ""
        again = " (already finished; nothing to do)" if self.already_finished else ""
        return f"{self.run_name}: {shown}{model} · MLflow run {self.run_id}{again}"


def dataset_for(cfg: RunConfig) -> DatasetInfo:
    method = get_method(cfg.method_name)
    return resolve_dataset(cfg.data.dataset or method.default_dataset, cfg.data.root)


def preflight(cfg: RunConfig) -> DatasetInfo:
    """Everything checkable without the cluster. Raises a one-line MethodlabError."""
    from methodlab import tracking

    settings = storage.configure(cfg.storage)
    storage.check_reachable(cfg.storage.path, settings)
    tracking.check_reachable(cfg.tracking.uri)
    info = dataset_for(cfg)
    for split in ("train", "val", "test"):
        if split not in info.splits:
            raise DataError(f"dataset {info.uri} has no {split!r} split (has {', '.join(info.splits)})")
    method = get_method(cfg.method_name)
    required = method.required_columns_for(info)
    missing = [c for c in required if c not in info.columns]
    if missing:
        raise DataError(f"dataset {info.uri} lacks column(s) {', '.join(missing)} that method "
                        f"{cfg.method_name} needs; pick a dataset with them (data.dataset)")
    check_contents(cfg, info)
    check_pretrained(cfg, info)
    if memory_budget(cfg) is not None:
        choose_loader(cfg, info)     # refuses an over-budget memory run here; else after ensure_ray
    return info


def check_pretrained(cfg: RunConfig, info: DatasetInfo) -> None:
    """Every model the method is told to load (`Method.pretrained_fields`) exists (a file or
    directory, a run, a registered version or alias), loads (weights only) and fits the run
    (`Method.pretrained_problem`: it takes the dataset's images; a predictor predicts its classes).
    Each is refused in one line naming the field before Ray starts, instead of inside the
    workers; a missing one that one of the method's `demo_prerequisites` registers (TOAST's and
    canonicalization's defaults on a fresh store) with the command that creates it."""
    from methodlab.config import load_config
    from methodlab.tracking import Tracker

    method = get_method(cfg.method_name)
    for field in method.pretrained_fields:
        uri = getattr(cfg.method, field)
        if uri in ("", "scratch"):
            continue
        store = cfg.tracking.uri[len("sqlite:///"):] if cfg.tracking.uri.startswith("sqlite:///") else None
        if uri.startswith(("models:/", "runs:/")) and store is not None and not os.path.exists(store):
            why = "the store does not exist yet"      # and asking must not create it
        elif uri.startswith(("models:/", "runs:/")):
            why = Tracker(cfg.tracking.uri, None).missing_model(uri)
        elif storage.is_s3(uri):
            why = None if storage.exists(uri) or storage.listdir(uri) else "no such object or prefix"
        else:
            why = None if os.path.exists(uri) else "no such file or directory"
        if why is None:
            _check_fits(cfg, info, field, uri)
            continue
        fix = f"set method.{field} to a model that exists"
        for prerequisite, overrides in method.demo_prerequisites:
            made = load_config(prerequisite, None, overrides).tracking.registered_model
            if uri.startswith(f"models:/{made}@") or uri.startswith(f"models:/{made}/"):
                command = " ".join(["methodlab", "train", prerequisite, *(f"'{o}'" if " " in o else o for o in overrides)])
                fix = f"create it with `{command}` (what make demo runs first), or {fix}"
        raise ConfigError(f"method.{field} {redact_value(uri)} does not exist in {redact_value(cfg.tracking.uri)} "
                          f"({why}); {fix}")


def _check_fits(cfg: RunConfig, info: DatasetInfo, field: str, uri: str) -> None:
    """The model at `uri` (which exists) loads and fits the run, or one line naming `method.<field>`."""
    import torch

    from methodlab.data.dataset import head_rows
    from methodlab.data.decode import decode_arrays
    from methodlab.models.hub import load_pretrained

    method = get_method(cfg.method_name)
    try:
        model, spec = load_pretrained(uri, cfg.tracking.uri, f"method.{field}", cfg.data.normalize)
    except ConfigError as e:      # (a foreign or unpicklable file, a checkpoint with no model)
        raise ConfigError(str(e) if f"method.{field}" in str(e) else f"method.{field}: {e}") from None
    column = method.export_input
    images = torch.from_numpy(decode_arrays(head_rows(info, "val", 2), info.columns, cfg.data.normalize)[column])
    why = method.pretrained_problem(cfg, info, field, model, spec, images)
    if why:
        shape = "x".join(map(str, info.columns[column].shape))
        raise ConfigError(f"method.{field} {redact_value(uri)} {why}; set method.{field} to a model that fits "
                          f"dataset {info.name} ({shape} images, {info.meta['num_classes']} classes), or pick "
                          "another dataset")


def check_contents(cfg: RunConfig, info: DatasetInfo) -> None:
    """What the data holds, from the Parquet footers (`column_ranges`): num_classes, labels in
    range, no null labels, no NaN or inf in float columns, a train split of at least one global
    batch (of at least one row with data.allow_tiny). Raises a one-line DataError; warns about a single-class train
    split. Without this a bad label failed ~25 s into the run with a raw torch error."""
    n = info.meta.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"{info.uri}/dataset.json: meta.num_classes must be a positive integer (got {n!r}); "
                        "fix the manifest")
    label = info.columns.get("label")
    if label is not None and label.shape == [] and np.dtype(label.dtype).kind not in "iu":
        raise DataError(f"dataset {info.uri}: column 'label' holds {label.dtype}; class labels are "
                        "integers 0..num_classes-1, re-create the dataset with integer labels")
    floats = [c for c, col in info.columns.items() if np.dtype(col.dtype).kind == "f"]
    checked = floats + (["label"] if label is not None and label.shape == [] else [])
    for split in SPLITS:
        ranges = column_ranges(info, split, checked)
        where = f"dataset {info.uri}, split {split!r}"
        for c in floats:
            r = ranges[c]
            if r.nan or (r.min is not None and not np.isfinite([r.min, r.max]).all()):
                raise DataError(f"{where}: column {c!r} holds NaN or inf; clean the data and re-create the dataset")
        if "label" not in ranges:
            continue
        r = ranges["label"]
        # STL-10's train split marks its unlabeled images with meta.unlabeled_label (-1).
        low = min(0, info.meta.get("unlabeled_label", 0)) if split == "train" else 0
        if r.nulls:
            raise DataError(f"{where}: {r.nulls} label(s) are missing (null); every row needs a label")
        if r.min is not None and (r.min < low or r.max >= n):
            raise DataError(f"{where}: labels span {r.min}..{r.max} but meta.num_classes is {n} (labels "
                            f"0..{n - 1}); fix the labels or num_classes in dataset.json")
        if split == "train" and r.min is not None and r.min == r.max:
            print(f"[methodlab] warning: {where} has a single class ({r.min}); the model cannot learn "
                  "to tell classes apart", flush=True)
    method = get_method(cfg.method_name)
    if any(method.train_source(cfg, stage) == "train" for stage in method.stages):
        rows = split_rows(info, "train")
        used = min(rows, cfg.data.limit_rows or rows)
        if used == 0:
            raise DataError(f"dataset {info.uri}: the train split has no rows; re-create the dataset with "
                            "training data")
        if used < global_batch(cfg) and not cfg.data.allow_tiny:
            raise DataError(f"dataset {info.uri}: the train split has {used} row(s), fewer than one global batch "
                            f"of {global_batch(cfg)} (train.batch_size={cfg.train.batch_size} x "
                            f"scaling.num_workers={cfg.scaling.num_workers}); lower the batch size, use more "
                            "data, or set data.allow_tiny=true")


def choose_loader(cfg: RunConfig, info: DatasetInfo) -> tuple[RunConfig, str]:
    """The config to ship, with `data.loader` concrete and the run name pinned to the one `cfg`
    derives (`RunConfig.identity`), and why that loader (for the run header). auto: memory when
    the held splits fit the per-node budget (`shared.memory_budget`), else stream. Refuses, with
    one line, data.loader=memory over budget. Needs Ray up unless data.memory_budget_mb is set."""
    names = "+".join(memory_splits(cfg, SPLITS) + (["tables"] if info.tables else []))
    if cfg.data.loader == "stream":
        return cfg, "stream (data.loader=stream)"
    budget, of = memory_budget(cfg)
    need = held_nbytes(cfg, info, SPLITS)
    fits = need <= budget
    can_stream = "stream" in get_method(cfg.method_name).loaders
    if not fits and (cfg.data.loader == "memory" or not can_stream):
        fix = "set data.loader=stream (or raise data.memory_budget_mb)" if can_stream else \
            f"{cfg.method_name} trains from memory only: raise data.memory_budget_mb"
        raise DataError(f"data.loader={cfg.data.loader}: {info.name}'s {names} take {fmt_bytes(need)}, over the "
                        f"{fmt_bytes(budget)} budget ({of}); {fix}")
    chosen = cfg.model_copy(deep=True)
    chosen.train.run_name = cfg.run_name
    chosen.data.loader = "memory" if fits else "stream"
    verb = "fit" if fits else "exceed"
    return chosen, f"{chosen.data.loader} ({names} {fmt_bytes(need)} {verb} {fmt_bytes(budget)}: {of})"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS if set (a cluster or `ray job submit`), else start a local Ray whose
    every listener is on 127.0.0.1.

    Ray binds its gRPC servers (GCS, raylet, object manager, workers), agents and metrics export
    on loopback only when the node's IP is loopback, and it replaces a loopback
    `_node_ip_address` by the host's address unless it runs in its single-machine mode
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported and inherited by the
    processes ray.init starts). A local Ray is this machine's alone, so that mode is set here,
    before ray is imported; a cluster (RAY_ADDRESS) keeps its own addresses. A process that
    imported ray before (a notebook, the test session) keeps Ray's default addresses: the mode
    must hold in the driver and in the processes it starts alike."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    local = not os.environ.get("RAY_ADDRESS")
    loopback = local and "ray" not in sys.modules
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # [ray] A new local Ray turns token authentication on when RAY_AUTH_MODE is unset, and
        # says so in a WARNING on every run; set to the mode it would choose (read when ray is
        # imported), it says nothing. The mode is Ray's default either way; a user's setting stands.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    configure_ray_logs()
    import ray

    if ray.is_initialized():
        return
    # Ray's INFO lines ("Started a local Ray instance", ...) drown the run's own, as Ray Train's
    # do (build_trainer); --verbose (or METHODLAB_LOG_LEVEL=INFO) brings them back.
    quiet = {"logging_level": log_level()}
    if not local:
        # A cluster's workers do not inherit this environment: the console settings go with the job.
        env = code_runtime_env()
        if forwarded_env():
            env["env_vars"] = forwarded_env()
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env=env, **quiet)
    else:
        # The dashboard process also hosts the state API that Ray Train's placement-group cleaner
        # needs; without it a stopped trial leaks its CPUs. address="local": a new instance, never
        # a cluster that happens to run on this machine. [ray] The cleaner (a detached actor)
        # finds the state API from RAY_API_SERVER_ADDRESS, else by scanning the host for Ray
        # instances: with a second one there it failed ("Found multiple active Ray instances"),
        # or found the other one (a `ray start` cluster) and took a live controller for dead. So
        # the dashboard gets a port picked here, and every process of this Ray (they inherit the
        # environment ray.init finds) is told it; the driver's own environment is left as it was,
        # for a process it starts that starts a Ray of its own must not inherit this address.
        port = _free_port()
        before = os.environ.get(STATE_API_ENV)
        os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, log_to_driver=True, **quiet,
                     **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
        finally:
            if before is None:
                del os.environ[STATE_API_ENV]
            else:
                os.environ[STATE_API_ENV] = before


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"    # [ray] where Ray's state API clients find the dashboard


def log_level() -> str:
    """The level of Ray's and MLflow's own log lines (`console.library_log_level`)."""
    return library_log_level()


def _free_port() -> int:
    """A loopback port nothing listens on now (the dashboard binds it a moment later)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def code_runtime_env() -> dict:
    """The driver's own methodlab, shipped to every task and actor of the job (Ray Train workers,
    Tune trials) as a `py_modules` package: workers never rely on an install on their node (the
    `rayproject/ray` image has none), nor on a copy that could differ from what the driver runs.
    Ray merges it into the runtime env of a `ray job submit` (its working_dir, env_vars, pip)."""
    import methodlab

    return {"py_modules": [os.path.dirname(os.path.abspath(methodlab.__file__))]}


def _local_location(uri: str) -> bool:
    """A path or file:// URI: on this node's disk only."""
    return uri.startswith("file:") or "://" not in uri


def check_shared_services(cfg: RunConfig, info: DatasetInfo) -> None:
    """On a cluster of more than one node, every worker must see the same tracking store,
    checkpoints and data: a SQLite file or a local directory is another one on every node (rank 0
    elsewhere would write another SQLite file and the run would fail only at its end). Refused in
    one line before any worker starts; a single node keeps them."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))  # [ray]
    if nodes < 2:
        return
    uri = cfg.tracking.uri
    where = f"the cluster has {nodes} nodes, and each would have its own"
    if uri.startswith("sqlite:") or _local_location(uri):
        raise ConfigError(f"tracking.uri={redact_value(uri)}: {where} copy of this store; use a tracking server every node "
                          "reaches (tracking.uri=http://host:5000, see infra/)")
    if not storage.is_s3(cfg.storage.path):      # (storage.path and datasets are a local path or s3://)
        raise ConfigError(f"storage.path={cfg.storage.path}: {where} directory; use shared storage "
                          "(storage.path=s3://bucket/runs)")
    if not storage.is_s3(info.uri):
        key = "data.dataset" if cfg.data.dataset and info.uri.rstrip("/") == cfg.data.dataset.rstrip("/") else "data.root"
        raise ConfigError(f"{key}: the dataset is at {info.uri}, and {where} copy; put it on shared storage "
                          f"({key}=s3://bucket/{'data' if key == 'data.root' else 'datasets/name'})")


def data_cpus(cfg: RunConfig) -> float:
    """The CPU a run keeps for Ray Data's read tasks when it streams its train split
    (data.loader=stream): the workers' placement group holds their CPUs, so the reads need one of
    their own."""
    return 1 if cfg.data.loader == "stream" else 0


def run_cpus(cfg: RunConfig) -> float:
    """Every CPU one run takes: its workers' and Ray Data's."""
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + data_cpus(cfg)


def _capacity_shortfall(cfg: RunConfig) -> str | None:
    """What the cluster lacks for the run (`run_cpus`, and its workers' GPUs), or None."""
    import ray

    total = ray.cluster_resources()  # [ray]
    sc = cfg.scaling
    need_cpu = run_cpus(cfg)
    if need_cpu > total.get("CPU", 0) + 1e-9:
        reads = f" (+{data_cpus(cfg):g} CPU for Ray Data reads)" if data_cpus(cfg) else ""
        return (f"scaling.num_workers={sc.num_workers} x scaling.cpus_per_worker={sc.cpus_per_worker}{reads}"
                f" needs {need_cpu:g} CPUs but the cluster has {total.get('CPU', 0):g}")
    need_gpu = sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0
    if need_gpu > total.get("GPU", 0) + 1e-9:
        return (f"scaling.use_gpu=true needs {need_gpu:g} GPUs (scaling.num_workers={sc.num_workers} x "
                f"scaling.gpus_per_worker={sc.gpus_per_worker}) but the cluster has {total.get('GPU', 0):g} "
                "(scaling.use_gpu=false trains on CPUs)")
    return None


def check_capacity(cfg: RunConfig) -> None:
    """Refuse, before any run exists, a run the cluster cannot place: Ray Train would wait for
    its placement group forever. On an autoscaling cluster, `scaling.wait_for_nodes_s` asks the
    autoscaler for the workers' bundles first and waits that long for the nodes to join."""
    short = _capacity_shortfall(cfg)
    wait_s = cfg.scaling.wait_for_nodes_s
    if short and wait_s > 0:
        from ray.autoscaler.sdk import request_resources  # [ray]

        sc = cfg.scaling
        worker = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
        print(f"{short}; asking the autoscaler and waiting up to {wait_s:g}s (scaling.wait_for_nodes_s)",
              flush=True)
        deadline = time.monotonic() + wait_s
        reads = [{"CPU": data_cpus(cfg)}] if data_cpus(cfg) else []
        request_resources(bundles=[worker] * sc.num_workers + reads)  # [ray]
        try:
            while short and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                short = _capacity_shortfall(cfg)
        finally:
            # The request is persistent until overridden; once the run's placement group holds
            # the nodes it is not needed, and left in place it would keep them up after the run.
            request_resources(bundles=[])  # [ray]
        if short:
            raise ConfigError(f"{short} after waiting scaling.wait_for_nodes_s={wait_s:g}; lower scaling.num_workers "
                              "or the per-worker resources, or raise the autoscaler's max_workers for that node type")
    if short:
        raise ConfigError(f"{short}; lower scaling.num_workers or the per-worker resources, add nodes, or on "
                          "an autoscaling cluster set scaling.wait_for_nodes_s (e.g. 900)")


def _storage_kwargs(cfg: RunConfig) -> dict:
    if storage.is_s3(cfg.storage.path):
        fs, path = storage.filesystem(cfg.storage.path, storage.S3Settings.from_config(cfg.storage))
        return {"storage_path": path, "storage_filesystem": fs}
    os.makedirs(cfg.storage.path, exist_ok=True)
    return {"storage_path": cfg.storage.path}


def stream_sources(cfg: RunConfig) -> list[str]:
    """The sources (`Method.train_source`) that the stages of the run train on, for
    `data.loader=stream`: each becomes a Ray Dataset of the TorchTrainer, named by the source."""
    method = get_method(cfg.method_name)
    return sorted({method.train_source(cfg, stage) for stage, epochs in method.epochs_by_stage(cfg).items() if epochs})


def stream_dataset(cfg: RunConfig, info: DatasetInfo, source: str = "train"):
    """One source as a Ray Dataset for `data.loader=stream`: the train split (its first
    `data.limit_rows` rows, as the memory loader takes) or a side table ("table:<name>").

    Its order is the first half of the shuffle: blocks (files) in an order seeded by
    `train.seed`, the same every epoch; the worker's local shuffle buffer, reseeded every epoch
    (`loop.stream_batches`), is the second. Both are functions of the seed alone, so an epoch's
    order is reproducible (needed to resume at its exact batch, `train.core`)."""
    import ray.data
    from ray.data import FileShuffleConfig, RandomSeedConfig

    ray.data.DataContext.get_current().enable_progress_bars = False
    fs = storage.filesystem(info.uri)[0] if storage.is_s3(info.uri) else None
    table = source.removeprefix("table:") if source.startswith("table:") else None
    limit = cfg.data.limit_rows if table is None else None
    # Every epoch re-plans the read and re-reads Parquet (about 1 s of fixed cost per epoch on
    # 2 CPUs, bench/data_path.py); a split within the cache limit is read once, and every epoch
    # streams it from the object store instead. (Side tables are held in memory by every worker
    # already: always cached.)
    cache = table is not None or split_nbytes(info, "train") <= cfg.data.stream_cache_mb * 2**20
    seed = cfg.train.seed
    if cache or limit:
        # Read in file order: the limit takes the first rows, and the cache holds them once.
        ds = ray.data.read_parquet(info.table_uri(table) if table else info.split_uri("train"), filesystem=fs)
        if limit:
            ds = ds.limit(limit)
        if cache:
            ds = ds.materialize()
        # Shuffles references to blocks (no copies); without the cache it would be a barrier
        # that holds the whole read in the object store, hence the file order below.
        return ds.randomize_block_order(seed=RandomSeedConfig(seed, reseed_after_execution=False))
    # Streamed from Parquet every epoch: the files are read in the seeded order (a streaming read).
    return ray.data.read_parquet(info.split_uri("train"), filesystem=fs,
                                 shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=False))


def build_trainer(cfg: RunConfig, info: DatasetInfo, run_id: str, callbacks=None, recovered: str | None = None,
                  started_at: float | None = None):
    """The TorchTrainer for one run (also used by each Tune trial)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, \
        ScalingConfig
    from ray.train.torch import TorchTrainer

    from methodlab.train.faults import ENV as FAULTS_ENV
    from methodlab.train.loop import SCORE_KEY, train_worker

    if cfg.data.loader == "auto":       # (a sweep's trial: `train` resolved it before)
        cfg, _ = choose_loader(cfg, info)
    # memory: the driver puts every split once into Ray's object store; every worker maps it
    # (one copy per node) and draws its own seeded shard, so resumes are bit-exact. stream: Ray
    # Data reads what the stages train on (the train split, side tables: `stream_sources`) and
    # splits it between workers, for datasets larger than a worker's memory; preserve_order keeps
    # the seeded order (`stream_dataset`) and makes each worker's equal shard the same every time.
    shared = put_splits(cfg, info, SPLITS)
    datasets, data_config, stream_rows = None, None, {}
    if cfg.data.loader == "stream":
        datasets = {source: stream_dataset(cfg, info, source) for source in stream_sources(cfg)}
        stream_rows = {source: ds.count() for source, ds in datasets.items()}   # (Parquet footers, or cached)
        data_config = DataConfig(datasets_to_split=list(datasets),
                                 execution_options=ExecutionOptions(preserve_order=True))
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_worker,
        # `faults` is the tests' fault injection ($METHODLAB_FAULTS), never part of the config.
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "dataset_uri": info.uri, "splits": SPLITS, "shared": shared, "stream_rows": stream_rows,
                           "recovered_checkpoint": recovered,
                           "faults": os.environ.get(FAULTS_ENV), "launched_at": started_at or time.time(),
                           "progress": "bar" if sys.stdout.isatty() else "lines"},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RayRunConfig(
            name=cfg.run_name,
            # The best num_to_keep by the method's metric, plus the latest (Ray always keeps it).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep, checkpoint_score_attribute=SCORE_KEY,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # [ray] Ray Train's own lines (resources, worker group, process group, DDP wrapping,
            # "Checkpoint successfully created") at METHODLAB_LOG_LEVEL, WARNING by default.
            logging_config=LoggingConfig(log_level=log_level()),
            callbacks=callbacks,
            **_storage_kwargs(cfg)),
        datasets=datasets,
        **({"dataset_config": data_config} if data_config else {}),
    )


def worker_error_line(exc: BaseException) -> str:
    """The worker's own exception line out of Ray's wrapped error text."""
    text = str(exc)
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, flags=re.M)
    for name, msg in reversed(found):
        if name not in ("WorkerGroupError", "TrainingFailedError", "RayTaskError", "ControllerError"):
            return f"{name}: {msg.strip()}"
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def local_fallback_to_upload(cfg: RunConfig) -> Path:
    """`methodlab train ... resume`: the checkpoint rank 0 kept on local disk during an S3 outage,
    or one line saying why there is none (checked before anything is written)."""
    from methodlab.train.loop import STATE_FILE, local_fallback_dir

    local = local_fallback_dir(cfg)
    if local is None:
        raise ConfigError(f"resume: storage.path={cfg.storage.path} is local, so every checkpoint is already "
                          "there; submit without `resume`")
    if not (local / STATE_FILE).exists():
        raise ConfigError(f"resume: no local checkpoint of run {cfg.run_name} in {local}; submit without "
                          f"`resume` to continue from {cfg.storage.path}")
    return local


def upload_local_fallback(cfg: RunConfig, local: Path) -> str:
    """Put the checkpoint `local_fallback_to_upload` found back into storage, next to Ray's own;
    returns its URI for the workers to compare."""
    target = f"{run_dir(cfg)}/recovered"
    try:
        storage.upload_dir(str(local), target)
    except OSError as e:
        raise ServiceError(f"resume: could not upload {local} to {target} ({str(e).splitlines()[0][:160]}); "
                           "is S3 back?") from None
    return target


def train(cfg: RunConfig, parent_run_id: str | None = None, resume: bool = False,
          started_at: float | None = None) -> RunSummary:
    """Run `cfg` to completion (or resume it) and return its summary. `resume` also picks up the
    checkpoint kept on local disk when S3 went away (see `upload_local_fallback`)."""
    started_at = started_at or time.time()
    info = preflight(cfg)
    local = local_fallback_to_upload(cfg) if resume else None
    # Held from before the MLflow run is looked up until the run ends: a second submission of the
    # name is refused before it creates or resumes anything (`train.lease`).
    with Lease(run_dir(cfg), "run", cfg.run_name, cfg.train.lease_timeout_s):
        return _train_leased(cfg, info, parent_run_id, local, started_at)


def _train_leased(cfg: RunConfig, info: DatasetInfo, parent_run_id: str | None, local: Path | None,
                  started_at: float) -> RunSummary:
    from methodlab.tracking import Tracker

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    name = cfg.run_name
    existing = tracker.find_run(name)
    if existing is not None and existing.status == "FINISHED":
        # Returning the finished run's result would silently ignore the new values.
        changed = sorted(changed_values(cfg, existing))
        if changed:
            raise ConfigError(f"run {name} already finished with other values of {', '.join(changed)}; set a new "
                              "train.run_name, or leave it unset (the derived name follows the config)")
        return _summary(tracker, cfg, existing.run_id, resumed=False, already=True)

    recovered = upload_local_fallback(cfg, local) if local else None
    ensure_ray()
    check_shared_services(cfg, info)
    cfg, loader = choose_loader(cfg, info)
    check_capacity(cfg)
    run_id = start_or_resume(tracker, cfg, info, existing, parent_run_id=parent_run_id)
    sc = cfg.scaling
    print(f"[{name}] {cfg.method_name} on {sc.num_workers} worker(s) ({'GPU' if sc.use_gpu else 'CPU'}), "
          f"global batch {cfg.train.batch_size} x {sc.num_workers} = {global_batch(cfg)}, loader: {loader}", flush=True)
    fit(tracker, cfg, info, run_id, recovered=recovered, started_at=started_at)
    finish(tracker, run_id)
    return _summary(tracker, cfg, run_id, resumed=existing is not None, already=False)


# ----------------------------------------------------------------------------------------------
# One run's life in MLflow, the same for `methodlab train` and for each sweep trial (which only
# adds tags, and Tune's callback): start_or_resume -> fit -> finish.


def changed_values(cfg: RunConfig, existing: RunRecord | None) -> dict[str, str]:
    """The values of `cfg` that decide what is trained and that the run of its name started with
    other values of. Only an explicit name can meet such a run (the derived name hashes them)."""
    from methodlab.tracking import differing_params, flatten_params

    return differing_params(flatten_params(cfg.compared_identity()), existing.params) if existing else {}


def start_or_resume(tracker: Tracker, cfg: RunConfig, info: DatasetInfo, existing: RunRecord | None,
                    tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run `cfg` trains into: `existing` (the unfinished run of its name) resumed, or a
    new run with the config as params and the platform's tags, plus `tags`."""
    from methodlab.tracking import (CHECKPOINT_ROOT_TAG, DATASET_TAG, METHOD_TAG, METRIC_TAG, RESUMED_WITH_TAG,
                                    WORKERS_TAG, flatten_params)

    workers = str(cfg.scaling.num_workers)
    if existing is not None:
        tracker.resume_run(existing.run_id)
        before = existing.tags.get(WORKERS_TAG, existing.params.get("scaling.num_workers", "")).split()
        tracker.set_tags(existing.run_id, {WORKERS_TAG: " ".join([*before, workers])})
        if before and before[-1] != workers:
            print(f"[{cfg.run_name}] resuming on {workers} workers (the last attempt ran on {before[-1]}): the "
                  f"global batch is now {global_batch(cfg)}, and the run is no longer bit-identical to one "
                  "that never changed", flush=True)
        changed = changed_values(cfg, existing)
        if changed:
            # A resume may change values (more epochs, say); MLflow params cannot change, so the
            # run says which ones its later epochs ran with.
            resumed_with = " ".join(f"{k}={changed[k]}" for k in sorted(changed))
            tracker.set_tags(existing.run_id, {RESUMED_WITH_TAG: resumed_with})
            print(f"[{cfg.run_name}] resuming with other values than it started with: {resumed_with}", flush=True)
        return existing.run_id
    method = get_method(cfg.method_name)
    run_id = tracker.start_run(cfg.run_name, {**flatten_params(cfg.recorded()),
                                              "train.global_batch_size": str(global_batch(cfg)),
                                              "data.uri": redact_value(info.uri)},
                               {METHOD_TAG: cfg.method_name, METRIC_TAG: method.metric, DATASET_TAG: info.name,
                                WORKERS_TAG: workers,
                                CHECKPOINT_ROOT_TAG: f"{cfg.storage.path.rstrip('/')}/{cfg.run_name}", **(tags or {})},
                               cfg.to_yaml(), parent_run_id=parent_run_id)
    # The manifest's hash: columns, splits and provenance; a re-import with other content differs.
    digest = hashlib.sha256(json.dumps(info.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    tracker.log_dataset(run_id, info.name, redact_value(info.uri), digest)
    return run_id


def run_dir(cfg: RunConfig) -> str:
    """The run's own prefix in storage (Ray's experiment directory): checkpoints and the lease."""
    return f"{cfg.storage.path.rstrip('/')}/{cfg.run_name}"


def fit(tracker: Tracker, cfg: RunConfig, info: DatasetInfo, run_id: str, what: str = "run", callbacks=None,
        recovered: str | None = None, started_at: float | None = None) -> None:
    """Train the run on Ray Train (`build_trainer`), its checkpoints checked first (the caller
    holds the run's lease). Any failure ends the MLflow run FAILED and raises one line that names
    the `what` ("run", "trial") and its checkpoints; SIGINT or SIGTERM stops the workers, ends it
    KILLED and raises `Interrupted` with the line to show."""
    controller, fired = [], []
    try:
        checkpoints.repair(run_dir(cfg), cfg.train.num_to_keep)
        trainer = build_trainer(cfg, info, run_id, callbacks=callbacks, recovered=recovered, started_at=started_at)
        # [ray] Ray's own SIGINT handler (registered inside fit) exits the driver with sys.exit and
        # leaves the MLflow run RUNNING; keep its controller instead, to stop the workers ourselves.
        trainer._register_sigint_handler = controller.append
        with stop_on_signals() as fired:
            result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise result.error
    except KeyboardInterrupt:      # (a signal's Interrupted too, or the plain one Ray makes of it)
        _abort(controller)
        _end_quietly(tracker, run_id, "KILLED")
        signum = fired[0] if fired else signal.SIGINT
        latest = checkpoints.latest(run_dir(cfg))
        raise Interrupted(signum, f"{what} {cfg.run_name} interrupted by {Interrupted.name(signum)}: workers "
                          f"stopped, MLflow run {run_id} KILLED; last checkpoint "
                          f"{latest or 'none (it starts from the beginning)'}; resume with: "
                          f"{resume_command(f'train.run_name={cfg.run_name}')}") from None
    except Exception as exc:   # noqa: BLE001 — every failure marks the run FAILED, then one line
        _end_quietly(tracker, run_id, "FAILED", if_running=True)
        raise TrainingError(f"{what} {cfg.run_name} failed: {worker_error_line(exc)} (MLflow run {run_id}; "
                            f"{_where_checkpoints_are(cfg)})") from None


def _abort(controller: list) -> None:
    """Stop the run's workers (Ray Train's controller aborts its worker group); best effort: the
    signal may have gone to the whole process group, local Ray included."""
    import ray

    for c in controller:
        try:
            ray.get(c.abort.remote(), timeout=30)  # [ray]
        except Exception:  # noqa: BLE001 — Ray already gone: so are the workers
            pass


def resume_command(named: str) -> str:
    """The command that resumes a run or sweep: the one that started it, when it was the CLI;
    `named` is the setting that names it (`train.run_name=...`, a sweep's `name=...`)."""
    import shlex

    if os.path.basename(sys.argv[0]) in ("cli.py", "methodlab"):
        return "methodlab " + shlex.join(sys.argv[1:])
    return f"the same submission again ({named})"


def finish(tracker: Tracker, run_id: str, tags: dict[str, str] | None = None) -> None:
    """The run trained to its end: its last tags, then FINISHED."""
    if tags:
        tracker.set_tags(run_id, tags)
    tracker.end_run(run_id, "FINISHED")


def global_batch(cfg: RunConfig) -> int:
    """Rows per optimizer step over all workers (train.batch_size is per worker)."""
    return cfg.train.batch_size * cfg.scaling.num_workers


def _where_checkpoints_are(cfg: RunConfig) -> str:
    from methodlab.train.loop import STATE_FILE, local_fallback_dir

    kept = f"the last checkpoint is kept under {run_dir(cfg)}"
    fallback = local_fallback_dir(cfg)
    if fallback is not None and (fallback / STATE_FILE).exists():
        # Whoever met the outage (rank 0's upload, or the controller's bookkeeping), the newest
        # checkpoint is the local copy.
        kept += (f" and the latest at {fallback}; if S3 went away, run the same command with `resume` "
                 "once it is back")
    return kept


def _end_quietly(tracker, run_id: str, status: str, if_running: bool = False) -> None:
    """Mark the run (with `if_running`, only if nothing ended it yet: `Tracker.end_run_if_running`);
    if the tracking server is down too, the error about the run still comes first."""
    from methodlab.tracking import fail_fast

    try:
        with fail_fast():
            (tracker.end_run_if_running if if_running else tracker.end_run)(run_id, status)
    except Exception:  # noqa: BLE001 — best effort: the run's own failure is what the user needs
        print(f"[methodlab] could not mark MLflow run {run_id} {status}: tracking server unreachable", flush=True)


def _summary(tracker, cfg: RunConfig, run_id: str, resumed: bool, already: bool) -> RunSummary:
    from methodlab.tracking import REGISTERED_VERSION_TAG

    run = tracker.client.get_run(run_id)
    version = run.data.tags.get(REGISTERED_VERSION_TAG)
    return RunSummary(cfg.run_name, run_id, run.info.status, dict(run.data.metrics),
                      cfg.tracking.registered_model if version not in (None, "none") else None,
                      version if version not in (None, "none") else None, resumed, already)


__all__ = ["train", "start_or_resume", "fit", "finish", "preflight", "ensure_ray", "build_trainer", "RunSummary",
           "ServiceError"]
