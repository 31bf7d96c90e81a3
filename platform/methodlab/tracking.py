"""MLflow, and only here: runs, params, metrics, artifacts, the model registry.

Every call goes through an explicit `MlflowClient(tracking_uri)`, never MLflow's global "active
run", so the driver and the rank-0 worker can write to the same run from different processes. Any
MLflow URI works: the default SQLite file under `.methodlab/`, or a tracking server.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from methodlab.console import library_log_level, verbose
from methodlab.errors import ConfigError, ServiceError
from methodlab.redact import REDACTED, SECRET_KEY, redact_value
from methodlab.spool import SpoolFile, drop, pending

# The tags methodlab sets on MLflow runs; runs are found and read back by them, so the names are
# part of every tracking store's history and must not change.
RUN_NAME_TAG = "methodlab.run_name"
METHOD_TAG = "methodlab.method"
METRIC_TAG = "methodlab.metric"                  # the method's metric, the one sweeps rank by
MODE_TAG = "methodlab.mode"                      # max | min, for that metric (sweep parents)
DATASET_TAG = "methodlab.dataset"
CHECKPOINT_ROOT_TAG = "methodlab.checkpoint_root"    # where Ray Train keeps the run's checkpoints
RESUMED_WITH_TAG = "methodlab.resumed_with"      # the values a resume changed (params cannot change)
WORKERS_TAG = "methodlab.workers_per_attempt"    # scaling.num_workers of each start and resume, e.g. "4 2"
RESUMED_AT_EPOCH_TAG = "methodlab.resumed_at_epoch"
REGISTERED_VERSION_TAG = "methodlab.registered_version"  # "none" when the run registered no version
REGISTERED_EPOCH_TAG = "methodlab.registered_epoch"
MODEL_SPEC_TAG = "methodlab.model_spec"
SWEEP_TAG = "methodlab.sweep"                    # "true" on a sweep's parent run
SWEEP_NAME_TAG = "methodlab.sweep_name"          # on each trial's run
TRIAL_PARAM_TAG = "methodlab.trial."             # + the space key: the trial's drawn value
SCHEDULER_TAG = "methodlab.scheduler"
STOPPED_TAG = "methodlab.stopped_early"
TRIAL_EPOCHS_TAG = "methodlab.trial_epochs"
BEST_RUN_ID_TAG = "methodlab.best_run_id"
BEST_CONFIG_TAG = "methodlab.best_config"
REGISTERED_MODEL_TAG = "methodlab.registered_model"  # on a sweep's parent: the best trial's model name
NOTE_TAG = "mlflow.note.content"                 # the markdown description the UI shows on a run's page
BENCHMARK_TAG = "methodlab.benchmark"            # on the runs bench/ logs its results to
IMPORTED_FROM_TAG = "methodlab.imported_from"  # `methodlab models import`: the --from source
LICENSE_TAG = "methodlab.license"                # the license string the importer passed
PARENT_TAG = "mlflow.parentRunId"
EPOCH_STEPS_TAG = "methodlab.epoch_steps"        # the MLflow step of each logged epoch (epoch_steps_tags)
EPOCH_STEPS_CHUNK = 4000   # characters per epoch-steps tag: well under MLflow's 8000 per tag value
# MLflow 3's UI opens an experiment on its GenAI overview unless its kind says otherwise.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "methodlab training runs: one run per config (params = the resolved "
                   "config), metrics per epoch, the dataset as the run's input; sweeps nest their trials."}
MAX_PARAM_VALUE = 6000     # MLflow's limit on a param value
MAX_PARAM_KEY = 250

# A fresh SQLite store makes MLflow print two INFO lines ("Creating initial MLflow database
# tables...") on stderr; users see them before their own error or result, so keep them at WARNING.
for _noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
# Logging a pyfunc model says "Validating input example against model signature" at INFO on
# every registration (an example that does not match the signature still raises).
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
# Registering a model downloads its files again, with tqdm bars that reach a Ray job's log as long
# lines of carriage returns. MLflow reads this at each download; users who want the bars set it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ----------------------------------------------------------------------------------------------
# Params: flattened, redacted, truncated


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}, with secrets redacted and MLflow's limits kept."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, dotted + "."))
            continue
        text = REDACTED if SECRET_KEY.search(str(key)) and value not in (None, "") else \
            redact_value(json.dumps(value) if isinstance(value, (list, dict)) else str(value))
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - 3] + "..."
        out[dotted[:MAX_PARAM_KEY]] = text
    return out


# Params that runs logged empty before they recorded the value used (RunConfig.recorded: an
# empty data.dataset, the method's default); such a run's '' matches the value recorded now.
RECORDED_RESOLVED = ("data.dataset", "base.data.dataset")


def differing_params(new: dict[str, str], logged: dict[str, str]) -> dict[str, str]:
    """The params in `new` that a run logged with another value (keys it never logged are skipped:
    runs from before a key existed; so are the `RECORDED_RESOLVED` ones it logged empty)."""
    return {k: v for k, v in new.items()
            if k in logged and logged[k] != v and not (k in RECORDED_RESOLVED and logged[k] == "")}


def provenance_tags() -> dict[str, str]:
    """`git_commit` and `git_dirty` of the code that runs: from the submitting checkout
    (`methodlab submit` sends them with the job), else from this process's own checkout."""
    from methodlab.provenance import COMMIT_ENV, DIRTY_ENV, provenance

    found = provenance()
    return {"git_commit": found[COMMIT_ENV], "git_dirty": found[DIRTY_ENV]}


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"      # set by Ray's job supervisor for a job's entrypoint


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's Source and User of a run, set on the driver: the command that started it, up to
    its first option or key=value (values may hold secrets, and the params have them), e.g.
    `methodlab train supervised`, prefixed by the Ray job's id inside a job (source type JOB, else
    LOCAL); the user is the submitting one (`provenance`: a job carries it), never a credential."""
    import sys

    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    from methodlab.provenance import USER_ENV, provenance

    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "python"
    words = ["methodlab" if program in ("cli.py", "methodlab") else program]
    for arg in argv[1:]:
        if arg.startswith("-") or "=" in arg:
            break
        words.append(arg)
    name, kind = " ".join(words), "LOCAL"
    if os.environ.get(RAY_JOB_ENV):
        try:
            job = json.loads(os.environ[RAY_JOB_ENV]).get("metadata", {}).get("job_submission_id")
        except (json.JSONDecodeError, AttributeError):
            job = None
        name, kind = f"ray job {job or '(unknown id)'}: {name}", "JOB"
    return {MLFLOW_SOURCE_NAME: redact_value(name)[:MAX_PARAM_VALUE], MLFLOW_SOURCE_TYPE: kind,
            MLFLOW_USER: provenance()[USER_ENV]}


# ----------------------------------------------------------------------------------------------
# Reachability


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Preflight for a tracking server; a SQLite or file store only needs a writable directory.
    Messages show the URI redacted; a server's credentials (in the URI, or MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD, as MLflow reads them) are sent, never shown."""
    shown = redact_value(uri)
    if uri.startswith(("http://", "https://")):
        url, headers = _split_credentials(uri)
        try:
            request = urllib.request.Request(f"{url.rstrip('/')}/health", headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if r.status != 200:
                    raise ServiceError(f"MLflow server {shown} answered /health with {r.status}; check it")
        except urllib.error.HTTPError as e:
            raise ServiceError(f"MLflow server {shown} answered /health with {e.code}; check it "
                               "(401/403: check the credentials)") from None
        except (urllib.error.URLError, OSError, TimeoutError, ValueError):
            raise ServiceError(f"MLflow tracking server {shown} is unreachable; start it "
                               "(make stack-up) or fix tracking.uri") from None
    elif uri.startswith("sqlite:///"):
        db = sqlite_path(uri)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tracking.uri {shown}: cannot create {db.parent} ({e.strerror}); "
                              "point tracking.uri at a writable place") from None
        target = db if db.exists() else db.parent
        if not os.access(target, os.W_OK):
            raise ConfigError(f"tracking.uri {shown}: {target} is not writable; "
                              "point tracking.uri at a writable place")
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise ConfigError(f"tracking.uri {shown!r} is not a supported MLflow URI; use http(s)://, "
                          "sqlite:/// or file://")


# MLflow 3.17's UI decides between its GenAI pages (Overview, traces) and the training runs by the
# `workflowType` URL parameter, else the browser's stored choice (default genai), not by the
# experiment's mlflow.experimentKind tag: a link without it opens a fresh browser on the GenAI
# Overview, seen in headless chromium (tests/test_ui.py opens the report's link).
UI_QUERY = "?workflowType=machine_learning"


def ui_link(base: str, route: str) -> str:
    """`route` ("experiments/1/runs", "models/NAME/versions/3") in the MLflow UI at `base` (empty: a
    link relative to the page that holds it); experiment pages open on the training runs."""
    query = UI_QUERY if route.startswith("experiments/") else ""
    return f"{base.rstrip('/')}/#/{route}{query}" if base else f"#/{route}{query}"


def _split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """A server URI without its userinfo, and the Basic-auth header it (or the environment) carries."""
    parsed = urllib.parse.urlsplit(uri)
    user = urllib.parse.unquote(parsed.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = urllib.parse.unquote(parsed.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    host = parsed.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit(parsed._replace(netloc=host))
    if not user:
        return url, {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return url, {"Authorization": f"Basic {token}"}


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


@contextlib.contextmanager
def store_lock(uri: str):
    """Held while a SQLite store is opened: MLflow creates and migrates a fresh store's tables on
    first use, and two processes doing that at once crash one of them (`table
    _alembic_tmp_experiments already exists`). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = sqlite_path(uri).with_name(sqlite_path(uri).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


LOCKED_ATTEMPTS = 10       # about a minute of backoff in all: far beyond any one write's lock


def retry_locked(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, retried while a SQLite store answers "database is locked". SQLite
    serializes writers, and sixteen trials with their driver writing one file meet each other's
    transactions; a locked write committed nothing, so running it again is safe. Jittered
    exponential backoff, so waiting writers do not collide again in step."""
    for attempt in range(LOCKED_ATTEMPTS):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — sqlalchemy's OperationalError arrives wrapped by MLflow
            if "database is locked" not in str(e) or attempt == LOCKED_ATTEMPTS - 1:
                raise
            time.sleep(min(0.1 * 2 ** attempt, 8.0) * (0.5 + random.random()))


class LockRetryingClient:
    """An MlflowClient whose every call goes through `retry_locked`: what a Tracker on a SQLite
    store uses, so that every write from a driver, a trial or a worker survives a busy file."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.wraps(attr)(lambda *args, **kwargs: retry_locked(attr, *args, **kwargs))


# ----------------------------------------------------------------------------------------------
# The registered model as MLflow serves it


@functools.cache
def pyfunc_model_class() -> type:
    """The registered model's class, defined on first use: `mlflow.pyfunc` is a heavy import
    (pandas, MLflow's GenAI types) that most commands never need."""

    class PyfuncModel(mlflow.pyfunc.PythonModel):
        """A registered model as MLflow's pyfunc: raw rows (the signature's dtype and shape, as
        the dataset stores them) in; a DataFrame of `label` and `probabilities` out
        (`models.serving.Predictor`). Rebuilt at load from the model's artifacts,
        `model_spec.json` and the weights-only `weights.pt`: nothing pickled is loaded."""

        def load_context(self, context):
            from methodlab.models.serving import Predictor

            spec = json.loads(Path(context.artifacts["model_spec"]).read_text())
            self.predictor = Predictor.from_files(spec, context.artifacts["weights"], context.model_config["input"])

        # (The np.ndarray hint tells MLflow not to infer a schema from hints: the signature has it.)
        def predict(self, context, model_input: np.ndarray, params=None):
            import pandas as pd

            out = self.predictor.predict(np.asarray(model_input))
            return pd.DataFrame({k: list(v) if v.ndim > 1 else v for k, v in out.items()})

    return PyfuncModel


def set_pyfunc_model() -> None:
    """What the model's code file runs when MLflow loads it."""
    mlflow.models.set_model(pyfunc_model_class()())


# MLflow 3 refuses to unpickle a python_model by default, so the model is logged "from code":
# this file, saved with the model, is what MLflow runs to get it; methodlab must be importable
# where it loads (the platform's venv: `methodlab serve`).
PYFUNC_CODE = "methodlab_pyfunc.py"
PYFUNC_CODE_TEXT = "from methodlab.tracking import set_pyfunc_model\n\nset_pyfunc_model()\n"


def serve_command(model_uri: str, tracking_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `mlflow models serve` for a registered model, run with this venv's Python:
    its bin directory first on PATH (MLflow starts `uvicorn` by name) and `--env-manager local`
    (the model needs methodlab, which is not on PyPI)."""
    import sys

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": tracking_uri}
    argv = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port)]
    return argv, env


# ----------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    run_id: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


# What MLflow prints (its `eprint`, to stderr, not a logger) when it registers a version: the
# run's summary line says the same. Anything else printed then is passed on.
MLFLOW_REGISTRY_LINES = re.compile(r"^(Successfully registered model '.*'\.|Created version '.*' of model '.*'\.|"
                                   r"Registered model '.*' already exists\. Creating a new version of this model\.\.\.)$")


@contextlib.contextmanager
def registry_lines_quieted():
    """MLflow's registration lines (`MLFLOW_REGISTRY_LINES`) kept off the console for the calls
    inside; every other line written to stderr meanwhile (a warning, an error) is written after
    them, and all of them with --verbose. (sys.stderr is the process's: the calls are on the
    thread that registers, once per run, with training over.)"""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        kept = [ln for ln in held.getvalue().splitlines(keepends=True) if not MLFLOW_REGISTRY_LINES.match(ln.strip())]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_mlflow() -> None:
    """MLflow's INFO lines (registering, waiting for a version, "View run at") in every process
    that tracks, workers included: the run's own lines say what was registered."""
    logging.getLogger("mlflow").setLevel(library_log_level())
    if library_log_level() != "INFO":
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class Tracker:
    def __init__(self, uri: str, experiment: str | None):
        """`experiment=None` only addresses existing runs (e.g. `methodlab sync`)."""
        quiet_mlflow()
        self.uri = uri
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)          # creates a fresh store's tables
            self.client = LockRetryingClient(client) if uri.startswith("sqlite:") else client
            self.experiment_id = self._experiment(experiment) if experiment else None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///"):
            # Next to the database, not wherever the process happens to run.
            artifact_location = (sqlite_path(self.uri).parent / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except MlflowException:   # created concurrently by another process
            return self.client.get_experiment_by_name(name).experiment_id

    # -- runs -------------------------------------------------------------------------------

    def find_run(self, run_name: str) -> RunRecord | None:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        r = runs[0]
        return RunRecord(r.info.run_id, r.info.status, dict(r.data.metrics), dict(r.data.params), dict(r.data.tags))

    def start_run(self, run_name: str, params: dict[str, str], tags: dict[str, str],
                  config_yaml: str, parent_run_id: str | None = None) -> str:
        source = source_tags()
        if parent_run_id:
            # A sweep's trial starts in a Tune actor, whose command line is Ray's worker: it has
            # the source and user of its parent, the sweep's driver.
            parent = self.client.get_run(parent_run_id).data.tags
            source = {k: parent.get(k, v) for k, v in source.items()}
        all_tags = {RUN_NAME_TAG: run_name, **provenance_tags(), **source, **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):     # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])
        self.client.log_text(run_id, redact_value(config_yaml), "config.yaml")
        return run_id

    def log_dataset(self, run_id: str, name: str, uri: str, digest: str, context: str = "training") -> None:
        """The run's dataset as an MLflow input (name, digest, source URI: the Dataset column)."""
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        # By type, not resolve_dataset_source(uri): MLflow registers its local source twice and
        # warns that a path "can be interpreted in multiple ways".
        kinds = {cls._get_source_type(): cls for cls in get_registered_sources()}
        source = kinds["s3" if uri.startswith("s3://") else "local"](uri)
        dataset = MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def stopped_children(self, parent_run_id: str, since_ms: int) -> list[tuple[str, str, str]]:
        """(run id, run name, status) of each child run of `parent_run_id` (a sweep's trials) that
        a stop at `since_ms` (ms since the epoch) interrupted: still RUNNING, already KILLED by its
        own trial as Tune stopped it, or ended FAILED after `since_ms` (its trial's Ray Train
        controller torn down under it as Tune stopped the trial's actor)."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10_000)
        return [(r.info.run_id, r.data.tags.get(RUN_NAME_TAG, r.info.run_name), r.info.status) for r in runs
                if r.info.status in ("RUNNING", "KILLED")
                or (r.info.status == "FAILED" and (r.info.end_time or 0) >= since_ms)]

    def resume_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def end_run_if_running(self, run_id: str, status: str) -> None:
        """End the run `status` unless something else ended it first: a trial whose fit fails
        because Tune is stopping it (its Ray Train controller torn down) may get here after the
        sweep driver marked its run KILLED, and that KILLED is the truth."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.end_run(run_id, status)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    tags: dict[str, str] | None = None) -> None:
        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def logged_epochs(self, run_id: str) -> dict[int, int]:
        """{epoch: MLflow step} of the epochs the run has logged (`EPOCH_STEPS_TAG`)."""
        tags = self.client.get_run(run_id).data.tags
        if EPOCH_STEPS_TAG not in tags:
            # A run logged before the tag: its epochs are the points of its `epoch` metric.
            return {int(m.value): m.step for m in self.client.get_metric_history(run_id, "epoch")}
        return epoch_steps_from_tags(tags)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_object(self, run_id: str, obj, artifact_file: str) -> None:
        """A matplotlib Figure, text, or a dict (as JSON) as an artifact file."""
        if isinstance(obj, str):
            self.client.log_text(run_id, obj, artifact_file)
        elif isinstance(obj, dict):
            self.client.log_dict(run_id, obj, artifact_file)
        else:
            self.client.log_figure(run_id, obj, artifact_file)
            import matplotlib.pyplot as plt
            plt.close(obj)

    def ui_url(self, route: str) -> str:
        """A link to `route` (e.g. "models/NAME/versions/3") in the MLflow UI: absolute for a tracking
        server (without the userinfo of its URI), else relative ("#/..."), which opens in whatever UI
        shows the page that holds it (`mlflow ui` on a local store)."""
        server = self.uri.startswith(("http://", "https://"))
        return ui_link(_split_credentials(self.uri)[0] if server else "", route)

    def run_url(self, run_id: str) -> str:
        return self.ui_url(f"experiments/{self.experiment_id}/runs/{run_id}")

    def model_version_url(self, name: str, version: str) -> str:
        return self.ui_url(f"models/{urllib.parse.quote(name)}/versions/{version}")

    def log_params_once(self, run_id: str, params: dict[str, Any]) -> None:
        """Params are immutable in MLflow: log those the run does not have yet (resume-safe)."""
        have = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in params.items() if k not in have]
        if new:
            self.client.log_batch(run_id, params=new)

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    # -- models -----------------------------------------------------------------------------

    def log_model(self, run_id: str, model, spec: dict, input_example, registered_name: str | None,
                  tags: dict[str, Any], input_doc: dict | None = None) -> str | None:
        """Log `model` as an MLflow pyfunc model (`pyfunc_model_class`: its spec and a weights-only state
        dict, no pickled code) and register a version with alias `candidate`. Returns the version,
        or None when `registered_name` is None.

        `input_doc` (`models.serving.input_doc`, or an imported model's spec `input`) is the raw
        input the served model takes: its signature's dtype and shape, and the MLmodel metadata
        `input` with the scale, value range and normalization it applies itself. `input_example`
        is such raw rows; without `input_doc` the model takes the example's dtype and shape as they are."""
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

        from methodlab.models.serving import classifies

        doc = input_doc or {"dtype": str(input_example.dtype), "shape": [-1, *input_example.shape[1:]]}
        outputs = [ColSpec("long", "label"), ColSpec(Array("float"), "probabilities")] if classifies(spec) \
            else [ColSpec(Array("float"), "features")]
        signature = ModelSignature(Schema([TensorSpec(np.dtype(doc["dtype"]), tuple(doc["shape"]))]), Schema(outputs))
        example = np.asarray(input_example).astype(doc["dtype"])
        with tempfile.TemporaryDirectory() as tmp:
            spec_file, weights_file, code_file = f"{tmp}/model_spec.json", f"{tmp}/weights.pt", f"{tmp}/{PYFUNC_CODE}"
            Path(spec_file).write_text(json.dumps(spec))
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights_file)
            Path(code_file).write_text(PYFUNC_CODE_TEXT)
            mlflow.set_tracking_uri(self.uri)
            status = self.client.get_run(run_id).info.status
            with retry_locked(mlflow.start_run, run_id=run_id):
                info = retry_locked(
                    mlflow.pyfunc.log_model, name="model", python_model=code_file,
                    artifacts={"model_spec": spec_file, "weights": weights_file}, model_config={"input": doc},
                    signature=signature, input_example=example, metadata={"input": doc},
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
            # Leaving start_run() marks the run FINISHED; the run's owner decides its status.
            self.client.update_run(run_id, status=status)
        if registered_name is None:
            return None
        with registry_lines_quieted():
            version = retry_locked(mlflow.register_model, info.model_uri, registered_name).version
        for k, v in tags.items():
            self.client.set_model_version_tag(registered_name, version, k, str(v))
        self.client.set_registered_model_alias(registered_name, "candidate", version)
        return str(version)

    def register(self, run_id: str, model, spec: dict, input_example, registered_name: str | None,
                 version_tags: dict[str, Any], input_doc: dict | None = None, epoch: int | None = None) -> str | None:
        """`log_model` for a run (a `methodlab train` run, or a sweep's best trial): the version also
        gets the git commit as a tag, and the run records what it registered: the version ("none"
        with no `registered_name`), the model's spec and, where known, the epoch it is from."""
        version = self.log_model(run_id, model, spec, input_example, registered_name,
                                 {**version_tags, **provenance_tags()}, input_doc)
        self.set_tags(run_id, {REGISTERED_VERSION_TAG: version or "none", MODEL_SPEC_TAG: json.dumps(spec),
                               **({REGISTERED_EPOCH_TAG: epoch} if epoch is not None else {})})
        return version

    def register_import(self, registered_name: str, model, spec: dict, input_example) -> str:
        """A model no run trained (`methodlab models import`): a run of its own records where the
        weights came from (source, file, sha256, license) and registers them with alias `candidate`."""
        source = spec["source"]
        run_id = self.start_run(f"import-{registered_name}", {f"source.{k}": str(v) for k, v in source.items()},
                                {IMPORTED_FROM_TAG: source["from"], LICENSE_TAG: source["license"]},
                                json.dumps(spec, indent=2))
        try:
            # The spec's `input` is per row; the served model takes batches. (A spec without one
            # takes the example's dtype and shape as they are.)
            doc = {**spec["input"], "shape": [-1, *spec["input"]["shape"]]} if "input" in spec else None
            version = self.register(run_id, model, spec, input_example, registered_name,
                                    {IMPORTED_FROM_TAG: source["from"], LICENSE_TAG: source["license"],
                                     "sha256": source["sha256"]}, doc)
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")
        return version

    def missing_model(self, uri: str) -> str | None:
        """Why the models:/ or runs:/ `uri` names nothing in this store, or None when it exists.
        Looks the name up only (no download)."""
        try:
            if uri.startswith("runs:/"):
                self.client.get_run(uri[len("runs:/"):].strip("/").split("/")[0])
                return None
            name, _, which = uri[len("models:/"):].strip("/").partition("@")
            if which:
                self.client.get_model_version_by_alias(name, which)
                return None
            name, _, version = name.partition("/")
            if version:
                self.client.get_model_version(name, version)
            else:
                self.client.get_registered_model(name)
            return None
        except MlflowException as e:
            return str(e).splitlines()[0][:160]

    def download_model_files(self, model_uri: str, dst: str) -> tuple[dict, str]:
        """(spec, path of weights.pt) of a model logged by `log_model`, e.g. models:/name@alias."""
        mlflow.set_tracking_uri(self.uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
        except MlflowException as e:
            raise ConfigError(f"model {model_uri} not found in {self.uri} ({str(e).splitlines()[0][:120]}); "
                              "check the name, version or alias") from None
        hits = {p.name: p for p in Path(local).rglob("*") if p.name in ("model_spec.json", "weights.pt")}
        if len(hits) != 2:
            raise ConfigError(f"model {model_uri} was not logged by methodlab (no model_spec.json/weights.pt)")
        return json.loads(hits["model_spec.json"].read_text()), str(hits["weights.pt"])

    def promote(self, name: str, metric: str, mode: str, version: str | None = None) -> tuple[bool, str]:
        """Move alias `champion` to `version` (default: the `candidate`) if its metric beats the
        current champion's. Returns (moved, explanation)."""
        try:
            cand = self.client.get_model_version(name, version) if version else \
                self.client.get_model_version_by_alias(name, "candidate")
        except MlflowException:
            raise ConfigError(f"registered model {name!r} has no {'version ' + version if version else 'candidate'}; "
                              "train a run first or pass --version") from None
        cand_value = self._version_metric(cand, metric)
        try:
            champ = self.client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champ = None
        if champ is not None:
            champ_value = self._version_metric(champ, metric)
            better = cand_value > champ_value if mode == "max" else cand_value < champ_value
            if not better:
                return False, (f"{name} v{cand.version} {metric}={cand_value:.4f} does not beat champion "
                               f"v{champ.version} ({champ_value:.4f}); champion unchanged")
        self.client.set_registered_model_alias(name, "champion", cand.version)
        was = f" (was v{champ.version})" if champ is not None else ""
        return True, f"{name} v{cand.version} is now champion{was}: {metric}={cand_value:.4f}"

    def _version_metric(self, mv, metric: str) -> float:
        value = self.client.get_run(mv.run_id).data.metrics.get(metric) if mv.run_id else None
        if value is None:
            raise ConfigError(f"model version {mv.name} v{mv.version} has no metric {metric!r}")
        return float(value)


# ----------------------------------------------------------------------------------------------
# Metrics that survive a tracking server going away


@contextlib.contextmanager
def fail_fast():
    """MLflow's HTTP client retries a dead server for minutes by default; training must not wait
    for it, so spooled writes try once with a short timeout."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def epoch_steps_text(steps: dict[int, int]) -> str:
    """{epoch: MLflow step} as runs of evenly spaced steps, short enough for a tag however long
    the run (a run per stage and per change of steps per epoch): "1-3:47+47 4:161" is epochs 1,
    2, 3 at steps 47, 94, 141 and epoch 4 at step 161."""
    runs: list[list[int]] = []          # [first epoch, last epoch, first step, spacing]
    for epoch, step in sorted(steps.items()):
        last = runs[-1] if runs else None
        if last and epoch == last[1] + 1 and (last[0] == last[1] or step - last[2] == (epoch - last[0]) * last[3]):
            last[3] = last[3] if last[0] != last[1] else step - last[2]
            last[1] = epoch
        else:
            runs.append([epoch, epoch, step, 0])
    return " ".join(f"{a}:{s}" if a == b else f"{a}-{b}:{s}+{d}" for a, b, s, d in runs)


def parse_epoch_steps(text: str) -> dict[int, int]:
    """The inverse of `epoch_steps_text`."""
    out: dict[int, int] = {}
    for run in text.split():
        epochs, _, steps = run.partition(":")
        first, _, last = epochs.partition("-")
        start, _, spacing = steps.partition("+")
        for i, epoch in enumerate(range(int(first), int(last or first) + 1)):
            out[epoch] = int(start) + i * int(spacing or 0)
    return out


def epoch_steps_tags(steps: dict[int, int], chunk: int | None = None) -> dict[str, str]:
    """`epoch_steps_text(steps)` as run tags: `methodlab.epoch_steps`, continued in
    `methodlab.epoch_steps.2`, `.3`, ... at most `EPOCH_STEPS_CHUNK` characters each. The text
    stays a few entries long while steps per epoch are constant, but grows ~10 characters per
    epoch where they vary (Bad Batches drops batches), and one MLflow tag holds 8000: a long
    run's tag would be refused and every later flush fail. Entries fill the tags greedily, so a
    new epoch changes only the last one or two. `chunk`: `EPOCH_STEPS_CHUNK` unless given."""
    limit = chunk or EPOCH_STEPS_CHUNK
    chunks: list[list[str]] = [[]]
    for entry in epoch_steps_text(steps).split():
        if chunks[-1] and len(" ".join([*chunks[-1], entry])) > limit:
            chunks.append([])
        chunks[-1].append(entry)
    return {EPOCH_STEPS_TAG if i == 0 else f"{EPOCH_STEPS_TAG}.{i + 1}": " ".join(c) for i, c in enumerate(chunks)}


def epoch_steps_from_tags(tags: dict[str, str]) -> dict[int, int]:
    """The inverse of `epoch_steps_tags`, from a run's tags ({} when it has none)."""
    texts, i = [tags.get(EPOCH_STEPS_TAG, "")], 2
    while f"{EPOCH_STEPS_TAG}.{i}" in tags:
        texts.append(tags[f"{EPOCH_STEPS_TAG}.{i}"])
        i += 1
    return parse_epoch_steps(" ".join(texts))


class MetricSpool(SpoolFile):
    """Every epoch's metrics are appended to a local JSONL file first (`SpoolFile`), then written
    to MLflow. Lines MLflow could not take stay in the file and are retried at the next epoch, at
    the end of the run, or by `methodlab sync`; an epoch already in MLflow is never written twice
    (`flush_spool_file`)."""

    def __init__(self, tracker: Tracker, run_id: str, spool_dir: str | os.PathLike):
        super().__init__(tracker.uri, run_id, spool_dir)
        self.tracker = tracker
        # Until a flush sent everything, the run may hold a half-written epoch (of an earlier
        # process, or of this one's failed flush): look for it (`flush_spool_file`).
        self.settled = False

    def log(self, metrics: dict[str, float], step: int, epoch: int) -> bool:
        self.append(metrics, step, epoch)
        return self.flush()

    def flush(self) -> bool:
        """True when everything spooled is in MLflow (and the spool file is gone)."""
        self.settled = flush_spool_file(self.tracker, self.path, find_half_written=not self.settled)
        return self.settled


def flush_spool_file(tracker: Tracker, path: Path, find_half_written: bool = True) -> bool:
    """Send a spool file's epochs to MLflow, each once, on one step axis:

    - an epoch's metrics are logged at MLflow step = the global optimizer step at its end (all
      stages, all attempts), and the run's tag `methodlab.epoch_steps` (`epoch_steps_tags`) gains
      that epoch -> step;
    - an epoch is logged only when it is newer than the run's last logged epoch: a resume from a
      checkpoint older than that re-runs epochs MLflow has, and their first values stay;
    - the step never goes back: a resume on more workers re-runs epochs in fewer steps, and its
      first new epochs are logged one step past the last logged one until the global step
      passes it again;
    - with `find_half_written`, a write cut between its two transactions counts as logged
      (`_half_written_step`). Only the first flush of a process and the one after a failed
      flush need the look (one metric history read): a flush that returned normally wrote both."""
    lines = pending(path)
    if not lines:
        path.unlink(missing_ok=True)
        return True
    try:
        with fail_fast():
            run_id = lines[0]["run_id"]
            logged = tracker.logged_epochs(run_id)
            written = epoch_steps_tags(logged) if logged else {}
            for line in lines:
                # (Lines spooled before the epoch was recorded had the epoch index as their step.)
                epoch = line.get("epoch", line["step"] + 1)
                if epoch <= max(logged, default=0):
                    continue
                half_written = _half_written_step(tracker, run_id, logged, line) if find_half_written else None
                find_half_written = False       # (only the epoch after the last logged one can be)
                logged[epoch] = half_written if half_written is not None else \
                    max(line["step"], max(logged.values(), default=-1) + 1)
                tags = epoch_steps_tags(logged)
                tracker.log_metrics(run_id, {} if half_written is not None else line["metrics"], logged[epoch],
                                    {k: v for k, v in tags.items() if written.get(k) != v})
                written = tags
    except (MlflowException, OSError) as e:
        print(f"[methodlab] MLflow at {redact_value(tracker.uri)} unreachable ({type(e).__name__}); "
              f"{len(lines)} epoch(s) of metrics kept in {path} and retried later", flush=True)
        return False
    drop(path, len(lines))       # only what was sent: the loop may have appended meanwhile
    return not path.exists()


def _half_written_step(tracker: Tracker, run_id: str, logged: dict[int, int], line: dict) -> int | None:
    """The step of an epoch whose metrics are in MLflow without its `methodlab.epoch_steps` entry,
    or None. MLflow's `log_batch` commits a batch's metrics and its tags in two transactions
    (SqlAlchemyStore._log_metrics, then _set_tags), so a worker stopped between them (Ray tearing
    down a run whose async checkpoint upload failed while rank 0's writer is mid-flush) or a
    server lost between them leaves the epoch after the last logged one with metrics and no tag
    entry; logging it again would put it twice on the chart. One of the line's keys tells: it was
    committed with the others, and nothing else logs it past the last logged step."""
    key = next(iter(line["metrics"]), None)
    if key is None:
        return None
    last = max(logged.values(), default=-1)
    later = [m.step for m in tracker.client.get_metric_history(run_id, key) if m.step > last]
    return min(later, default=None)


def sync_spool(spool_dir: str | os.PathLike) -> list[str]:
    """`methodlab sync`: replay every spooled file into its tracking server; returns what was done."""
    done = []
    for path in sorted(Path(spool_dir).glob("*.jsonl")):
        lines = pending(path)
        if not lines:
            continue
        first = lines[0]
        ok = flush_spool_file(Tracker(first["uri"], None), path)
        shown = redact_value(first["uri"])
        done.append(f"{path.name}: {'synced to ' + shown if ok else 'still unreachable: ' + shown}")
    return done
