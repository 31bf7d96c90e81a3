"""Shared fixtures: one Ray cluster for the whole session, an isolated METHODLAB_HOME (datasets,
checkpoints, the MLflow SQLite store), and tiny configs per method."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

# Before ray is imported anywhere: no token file under the real HOME, no 2 s report stall.
_SESSION_HOME = tempfile.mkdtemp(prefix="methodlab-test-")
os.environ.setdefault("METHODLAB_HOME", os.path.join(_SESSION_HOME, "home"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("MLFLOW_TRACKING_URI", None)    # tests track into their own SQLite stores only
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", os.path.join(_SESSION_HOME, "ray"))
# Fake credentials for the moto S3 server of the tests (never real ones); Ray workers inherit them.
# The secret is distinctive so tests/test_security.py can scan logs and MLflow for it.
FAKE_SECRET = "fakeSecret-9QxZ7-methodlab"
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)
# A worker group that cannot be scheduled fails in seconds instead of retrying forever.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CI (.ci/run) draws the same hypothesis examples on every run, so a submission lands or fails on
# its code, not on the draw; developers' runs keep drawing new examples and so keep finding cases.
# (Loaded here, before the test modules' @settings, which inherit it.)
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

import methodlab.methods  # noqa: E402,F401  (fills the registries, as the CLI and the worker do)


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture()
def ray_cluster(_ray_session):
    """One local Ray (2 CPUs, dashboard on 127.0.0.1 for the placement-group cleaner) shared by the
    session's tests; started on first use, and again if a test needed the machine to itself."""
    import ray

    from methodlab.train.launch import ensure_ray

    if not ray.is_initialized():
        ensure_ray(num_cpus=2)       # (as a local run starts it, told its own state API address)
    return ray


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh METHODLAB_HOME for one test (its own MLflow store, runs and datasets)."""
    monkeypatch.setenv("METHODLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-tensor tests (`pytestmark = pytest.mark.usefixtures(...)`): on a shared
    2-core box a second intra-op thread only adds contention, 10-100x slower here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def epochs_logged(client, run_id: str, key: str = "val_acc") -> list[int]:
    """The epochs (1 = a run's first, over all stages) at which run `run_id` logged `key`, in step
    order: each MLflow step read back through the run's `methodlab.epoch_steps` tags (absent while
    no epoch is logged; a step the tag does not list raises KeyError). `client`: an MlflowClient
    (or a Tracker's)."""
    from methodlab.tracking import epoch_steps_from_tags

    epoch_at = {s: e for e, s in epoch_steps_from_tags(client.get_run(run_id).data.tags).items()}
    return [epoch_at[m.step] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def tiny(method_name: str, *extra: str) -> list[str]:
    """Overrides that make any registered method train in seconds."""
    from methodlab.registry import get_method

    return [*get_method(method_name).smoke_overrides, *extra]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def bucket(s3_server):
    """A fresh bucket on the test S3 server; yields (endpoint, bucket name)."""
    import uuid

    from methodlab import storage

    name = f"test-{uuid.uuid4().hex[:10]}"
    storage.s3_client(storage.S3Settings(s3_server, "us-east-1")).create_bucket(Bucket=name)
    return s3_server, name


class MlflowServer:
    """A real MLflow tracking server (SQLite backend, one worker) on 127.0.0.1 that a test can stop
    and start again on the same port."""

    def __init__(self, root):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.root, self.proc = root, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        import subprocess
        import time
        import urllib.request

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", f"{self.root}/artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy in 90 s")

    def stop(self):
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture()
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


def _spawned(rank: int, world: int, fn, args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"      # the ranks talk over the loopback interface only
    # A file rendezvous: no port to pick in advance (one picked and released can be taken
    # by another process before rank 0 binds it).
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # Both ranks done before either tears the group down: a rank that destroyed it while
        # the other still finished its last collective aborted at exit ("terminate called
        # without an active exception"), 1 run in ~8 here; with the barrier 24 in 24 passed.
        dist.barrier()
        dist.destroy_process_group()


def spawn_world(fn, world: int, *args) -> list:
    """`fn(*args)` on `world` fresh processes in one gloo process group on this machine (the
    torch.distributed setup a Ray Train worker group has, without Ray); returns each rank's
    result (which must be torch.save-able). `fn` must be importable (a module-level function)."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_spawned, args=(world, fn, args, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def pytest_collection_modifyitems(items):
    """A test that needs the reference venv (the `references` fixture: timm and torchvision in
    `.venv-ref`) is a parity test: `make test-parity` runs those, `make test` the rest."""
    for item in items:
        if "references" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.parity)

