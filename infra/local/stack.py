#!/usr/bin/env python3
"""The local methodlab stack: the same services a team runs, on 127.0.0.1, in one directory.

    infra/local/up.sh        (make stack-up)     start what is not running, wait for health, print URLs
    infra/local/down.sh      (make stack-down)   stop everything the scripts started
    .venv/bin/python infra/local/stack.py status | env

Services, each in its own session (process group) so that `down` can stop it with all its children:

  s3      moto's standalone S3 server; buckets `methodlab` (checkpoints, datasets) and `mlflow`
          (MLflow artifacts) are created on start. moto keeps objects in memory only.
  mlflow  MLflow tracking server, SQLite backend, artifacts proxied to s3://mlflow/artifacts
          (clients need no S3 access for artifacts), one worker, no job runner.
  ray     `ray start --head` with its job server (the dashboard), token authentication on; the
          token lives in a file the scripts hand to Ray via RAY_AUTH_TOKEN_PATH, never on a
          command line. Job drivers and workers inherit the S3 settings and the venv's PATH, so
          `python jobs/train.py ...` runs with the same interpreter and reaches the bucket.

Everything (pids, logs, the SQLite file, Ray's temp dir, the token, env.sh) is under
$METHODLAB_STACK_DIR (default .methodlab/stack). Ports and names come from the environment:

  METHODLAB_STACK_HOST (127.0.0.1)        METHODLAB_STACK_S3_PORT (9000)
  METHODLAB_STACK_MLFLOW_PORT (5000)      METHODLAB_STACK_DASHBOARD_PORT (8265)
  METHODLAB_STACK_RAY_PORT (6379)         METHODLAB_STACK_RAY_CLIENT_PORT (10001)
  METHODLAB_STACK_RAY_AGENT_PORT (52365)  METHODLAB_STACK_CPUS (all cores)
  METHODLAB_STACK_OBJECT_STORE_MB (Ray's default)
  METHODLAB_STACK_BUCKET (methodlab)      METHODLAB_STACK_MLFLOW_BUCKET (mlflow)
  METHODLAB_STACK_RAY_PYTHON (this venv's python): the interpreter Ray's node, its workers and
      the job drivers run, e.g. one without methodlab installed, as on a `rayproject/ray` image

Only the Python standard library and boto3 are used, so the script runs with the project's venv.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The binaries (ray, mlflow, moto_server) and the interpreter jobs run with: this venv's.
BIN = Path(sys.executable).parent
SERVICES = ("s3", "mlflow", "ray")          # start order; `down` goes in reverse
# moto accepts any credentials; these dummies keep real ones out of the local stack.
# Ray hands these to its worker processes (ray start's --min/--max-worker-port defaults).
RAY_WORKER_PORTS = (10002, 19999)
LOCAL_KEY_ID, LOCAL_SECRET, LOCAL_REGION = "methodlab-local", "methodlab-local-secret", "us-east-1"


class StackError(Exception):
    """A one-line failure of the scripts (printed as `error: ...`, exit 1)."""


@dataclass
class Settings:
    dir: Path
    host: str
    ports: dict[str, int]
    bucket: str
    mlflow_bucket: str
    cpus: int | None
    object_store_mb: int | None
    ray_python: Path

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ

        def port(name: str, default: int) -> int:
            raw = env.get(f"METHODLAB_STACK_{name}_PORT", str(default))
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StackError(f"METHODLAB_STACK_{name}_PORT={raw!r} is not a port number")
            return int(raw)

        def optional_int(name: str) -> int | None:
            raw = env.get(name)
            if raw in (None, ""):
                return None
            if not raw.isdigit() or int(raw) == 0:
                raise StackError(f"{name}={raw!r} must be a positive integer")
            return int(raw)

        ports = {"s3": port("S3", 9000), "mlflow": port("MLFLOW", 5000), "dashboard": port("DASHBOARD", 8265),
                 "gcs": port("RAY", 6379), "client": port("RAY_CLIENT", 10001), "agent": port("RAY_AGENT", 52365)}
        clash = [f"{k}={v}" for k, v in ports.items() if RAY_WORKER_PORTS[0] <= v <= RAY_WORKER_PORTS[1]]
        if clash:
            raise StackError(f"port(s) {', '.join(clash)} fall in Ray's worker port range "
                             f"{RAY_WORKER_PORTS[0]}-{RAY_WORKER_PORTS[1]}; pick others")
        if len(set(ports.values())) != len(ports):
            raise StackError(f"two services share a port: {ports}")
        return cls(
            dir=Path(env.get("METHODLAB_STACK_DIR", REPO / ".methodlab" / "stack")).resolve(),
            host=env.get("METHODLAB_STACK_HOST", "127.0.0.1"),
            ports=ports,
            bucket=env.get("METHODLAB_STACK_BUCKET", "methodlab"),
            mlflow_bucket=env.get("METHODLAB_STACK_MLFLOW_BUCKET", "mlflow"),
            cpus=optional_int("METHODLAB_STACK_CPUS"),
            object_store_mb=optional_int("METHODLAB_STACK_OBJECT_STORE_MB"),
            ray_python=Path(env.get("METHODLAB_STACK_RAY_PYTHON") or sys.executable),
        )

    # -- derived ---------------------------------------------------------------------------

    def url(self, port_name: str) -> str:
        return f"http://{self.host}:{self.ports[port_name]}"

    @property
    def token_file(self) -> Path:
        return self.dir / "ray_auth_token"

    @property
    def ray_tmp(self) -> Path:
        return self.dir / "ray"

    @property
    def home(self) -> Path:
        """METHODLAB_HOME of jobs: built-in datasets are prepared once, metric spools survive resubmits."""
        return self.dir / "home"

    def pid_file(self, service: str) -> Path:
        return self.dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url("s3"), "AWS_DEFAULT_REGION": LOCAL_REGION,
                "AWS_ACCESS_KEY_ID": LOCAL_KEY_ID, "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET}

    def client_env(self) -> dict[str, str]:
        """What a user's shell needs to talk to the stack (written to env.sh)."""
        return {"RAY_API_SERVER_ADDRESS": self.url("dashboard"), "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_file), "MLFLOW_TRACKING_URI": self.url("mlflow"),
                **self.s3_env()}


# ----------------------------------------------------------------------------------------------
# Processes


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], pgid [2], session [3])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def session_members(sid: int) -> list[int]:
    """Live processes of the session a service was started in (the service and all its children)."""
    out = []
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[0] not in ("Z", "X") and int(st[3]) == sid:
            out.append(pid)
    return out


def stack_processes(s: Settings, service: str) -> list[int]:
    """Everything that belongs to `service`: its session, and any process that inherited the
    marker `spawn` gives the service's environment (children that left the session, or a stack
    whose pid files were deleted by `make clean`, are still found). Never this process or its
    ancestors: a shell that exported METHODLAB_STACK_DIR has this stack's directory too, but not
    the marker, and `make stack-down` must not stop its own caller."""
    pids = set()
    sid = _read_pid(s, service)
    if sid is not None:
        pids.update(session_members(sid))
    for pid in _all_pids():
        if pid not in pids and _alive(pid) and _stack_marker(pid) == (str(s.dir), service):
            pids.add(pid)
    return sorted(pids - _ancestors())


def _ancestors() -> set[int]:
    """This process and every process above it."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        st = _stat(pid)
        pid = int(st[1]) if st is not None else 0
    return out


def _read_pid(s: Settings, service: str) -> int | None:
    try:
        return int(s.pid_file(service).read_text().strip())
    except (OSError, ValueError):
        return None


def running(s: Settings, service: str) -> bool:
    pid = _read_pid(s, service)
    return pid is not None and _alive(pid) and _stack_marker(pid) == (str(s.dir), service)


def _stack_marker(pid: int) -> tuple[str | None, str | None]:
    """(METHODLAB_STACK_DIR, METHODLAB_STACK_SERVICE) of `pid`'s environment: what `spawn` gives
    a service and its children inherit (guards against a reused pid, and tells services apart)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None, None
    found = dict(e.decode(errors="replace").partition("=")[::2] for e in env
                 if e.startswith((b"METHODLAB_STACK_DIR=", b"METHODLAB_STACK_SERVICE=")))
    return found.get("METHODLAB_STACK_DIR"), found.get("METHODLAB_STACK_SERVICE")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def spawn(s: Settings, service: str, argv: list[str], env: dict[str, str]) -> int:
    """Start `argv` in a new session (its own process group), output to the service's log."""
    s.log_file(service).parent.mkdir(parents=True, exist_ok=True)
    # A profile or session token from the user's shell would override the local dummies, and a
    # cluster address from it would point the stack's Ray elsewhere (RAY_API_SERVER_ADDRESS
    # outranks RAY_ADDRESS for state API clients): the caller's are dropped, the service's kept.
    dropped = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "RAY_ADDRESS", "RAY_AUTH_TOKEN",
               "RAY_API_SERVER_ADDRESS")
    full_env = {**{k: v for k, v in os.environ.items() if k not in dropped}, **env,
                "METHODLAB_STACK_DIR": str(s.dir), "METHODLAB_STACK_SERVICE": service}
    with open(s.log_file(service), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {service}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=s.dir, start_new_session=True)
    s.pid_file(service).write_text(str(proc.pid))
    return proc.pid


def stop_service(s: Settings, service: str, grace: float = 15.0) -> int:
    """SIGTERM every process group of the service, then SIGKILL what is left. Returns how many
    processes were stopped."""
    pids = stack_processes(s, service)
    stopped = len(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pgid in {int(st[2]) for st in map(_stat, pids) if st is not None}:
            if pgid > 1 and pgid != os.getpgrp():
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
        for pid in pids:       # members that moved to a group of their own
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break
            time.sleep(0.2)
        if not pids:
            break
    s.pid_file(service).unlink(missing_ok=True)
    if pids:
        raise StackError(f"{service}: processes {pids} survived SIGKILL")
    return stopped


# ----------------------------------------------------------------------------------------------
# Health


def _http_status(url: str, token: str | None = None, timeout: float = 2.0) -> int | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def healthy(s: Settings, service: str) -> bool:
    if service == "s3":
        return _http_status(f"{s.url('s3')}/moto-api/data.json") == 200
    if service == "mlflow":
        return _http_status(f"{s.url('mlflow')}/health") == 200
    token = s.token_file.read_text().strip() if s.token_file.exists() else None
    # The job server answers only once the dashboard head is up; 401 would mean a token mismatch.
    return _http_status(f"{s.url('dashboard')}/api/jobs/", token) == 200


def wait_healthy(s: Settings, service: str, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + max(timeout, 1.0)
    while time.monotonic() < deadline:
        if healthy(s, service):
            return
        if not _alive(pid):
            raise StackError(f"{service} exited during start-up: {_last_line(s.log_file(service))} "
                             f"(log: {s.log_file(service)})")
        time.sleep(0.3)
    raise StackError(f"{service} was not healthy after {timeout:.0f} s: {_last_line(s.log_file(service))} "
                     f"(log: {s.log_file(service)})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "empty log"


# ----------------------------------------------------------------------------------------------
# Services


def _s3_client(s: Settings):
    import boto3
    from botocore.config import Config

    e = s.s3_env()
    return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], region_name=LOCAL_REGION,
                        aws_access_key_id=LOCAL_KEY_ID, aws_secret_access_key=LOCAL_SECRET,
                        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=3))


def spawn_s3(s: Settings) -> int:
    return spawn(s, "s3", [str(BIN / "moto_server"), "-H", s.host, "-p", str(s.ports["s3"])], {})


def create_buckets(s: Settings) -> None:
    client = _s3_client(s)
    for bucket in (s.bucket, s.mlflow_bucket):
        client.create_bucket(Bucket=bucket)


def spawn_mlflow(s: Settings) -> int:
    return spawn(s, "mlflow", [
        str(BIN / "mlflow"), "server", "--host", s.host, "--port", str(s.ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{s.dir / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{s.mlflow_bucket}/artifacts",
        # MLflow's Host-header check admits loopback and private addresses only: a stack on
        # another address (a multi-node stack, add_node) names its own.
        *([] if ipaddress.ip_address(s.host).is_loopback else
          ["--allowed-hosts", f"{s.host},{s.host}:{s.ports['mlflow']},localhost,127.0.0.1"]),
    ], {**s.s3_env(), "MLFLOW_S3_ENDPOINT_URL": s.url("s3"),
        # One uvicorn worker and no job runner: healthy in ~5 s with ~0.5 GB instead of ~13 s / 3.4 GB.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def ray_env(s: Settings) -> dict[str, str]:
    """The environment of every Ray node of the stack (the head and `add-node`'s)."""
    return {
        **s.s3_env(),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(s.token_file),
        **({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if ipaddress.ip_address(s.host).is_loopback else {}),
        # Ray processes that look their cluster up (Ray Train's PlacementGroupCleaner uses the state
        # API) would otherwise scan the machine and fail on "multiple active Ray instances".
        "RAY_ADDRESS": f"{s.host}:{s.ports['gcs']}",
        # Job drivers run `python ...` from PATH: make that the node's interpreter.
        "PATH": f"{s.ray_python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "METHODLAB_HOME": str(s.home),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_USAGE_STATS_ENABLED": "0",
    }


def _ray_start(s: Settings) -> list[str]:
    return [str(s.ray_python), "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
            "--node-ip-address", s.host]


def spawn_ray(s: Settings) -> int:
    if not s.token_file.exists():
        s.token_file.write_text(secrets.token_hex(32))
    s.token_file.chmod(0o600)
    s.home.mkdir(parents=True, exist_ok=True)
    # Every Ray listener on the stack's host: Ray binds its gRPC servers (GCS, raylet, object
    # manager, workers), agents, metrics and client server to the node IP, and keeps a loopback
    # --node-ip-address (instead of replacing it by the host's address) only in its single-machine
    # mode, which the `ray start` process and its children read from the environment (ray_env).
    argv = [*_ray_start(s), "--head", "--port", str(s.ports["gcs"]),
            "--dashboard-host", s.host, "--dashboard-port", str(s.ports["dashboard"]),
            "--ray-client-server-port", str(s.ports["client"]),
            "--dashboard-agent-listen-port", str(s.ports["agent"]),
            "--temp-dir", str(s.ray_tmp)]
    if s.cpus:
        argv += ["--num-cpus", str(s.cpus)]
    if s.object_store_mb:
        argv += ["--object-store-memory", str(s.object_store_mb * 1024 * 1024)]
    return spawn(s, "ray", argv, ray_env(s))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_services(s: Settings) -> list[str]:
    """The worker nodes `add-node` started (node1, node2, ...), by their pid files."""
    return sorted((p.stem for p in s.dir.glob("node*.pid")), key=lambda n: int(n[4:] or 0))


def add_node(s: Settings, cpus: int, resources: dict[str, float]) -> str:
    """Join another Ray node to the running head, on the same host: the stack as a multi-node
    cluster on one machine (each node its own raylet, object store and resources), as the
    two-node tests run it. Returns the node's service name; `down` stops it with the rest.

    Ray refuses to join nodes to a head in its single-machine mode, which is what keeps a
    loopback stack's listeners on 127.0.0.1 (ray_env): a multi-node stack runs on an address the
    nodes share, METHODLAB_STACK_HOST=<this machine's address>, as a real cluster does."""
    saved = _load_state(s)
    if not saved or not running(s, "ray"):
        raise StackError("the stack's Ray head is not running; run up.sh first")
    if ipaddress.ip_address(s.host).is_loopback:
        raise StackError(f"METHODLAB_STACK_HOST={s.host}: Ray joins no node to a loopback-only head; start the "
                         "stack on this machine's address (METHODLAB_STACK_HOST=<address> up.sh) to add nodes")
    s.ports.update(saved["ports"])
    name = f"node{len(node_services(s)) + 1}"
    argv = [*_ray_start(s), "--address", f"{s.host}:{s.ports['gcs']}", "--num-cpus", str(cpus),
            # every node of a host needs an agent port of its own (Ray's default is one fixed port),
            # and a temp dir of its own: a starting node's runtime-env agent clears its session's
            # runtime_resources, which in a shared dir are the head's unpacked job working dirs
            "--dashboard-agent-listen-port", str(_free_port(s.host)), "--temp-dir", str(s.dir / f"ray-{name}")]
    if s.object_store_mb:
        argv += ["--object-store-memory", str(s.object_store_mb * 1024 * 1024)]
    if resources:
        argv += ["--resources", json.dumps(resources)]
    spawn(s, name, argv, ray_env(s))
    return name


SPAWNERS = {"s3": spawn_s3, "mlflow": spawn_mlflow, "ray": spawn_ray}
# Seconds to become healthy; generous because a loaded 2-core machine slows every start-up ~10x.
START_TIMEOUT = {"s3": 60, "mlflow": 180, "ray": 180}
# `ray start` gives the raylet a fixed 30 s to register with the GCS; on an overloaded machine
# that can run out, so Ray gets more than one try.
START_ATTEMPTS = {"s3": 1, "mlflow": 1, "ray": 3}


def _ports_of(service: str) -> list[str]:
    return {"s3": ["s3"], "mlflow": ["mlflow"], "ray": ["gcs", "dashboard", "client", "agent"]}[service]


# ----------------------------------------------------------------------------------------------
# Commands


def up(s: Settings) -> None:
    s.dir.mkdir(parents=True, exist_ok=True)
    s.dir.chmod(0o700)       # the token and the SQLite file are the user's alone
    saved = _load_state(s)
    if saved and any(running(s, svc) for svc in SERVICES):
        # Already (partly) up: keep the ports it runs on, whatever the environment says now.
        s.ports.update(saved["ports"])
    if not running(s, "s3"):
        # moto keeps objects in memory: a new S3 server is an empty one, so the MLflow database
        # (which points at artifacts in it) and Ray (whose jobs may hold its endpoint) start fresh too.
        for svc in ("ray", "mlflow"):
            if running(s, svc):
                stop_service(s, svc)
        (s.dir / "mlflow.db").unlink(missing_ok=True)
    to_start = [svc for svc in SERVICES if not running(s, svc)]
    busy = [f"{s.host}:{s.ports[p]} ({p})" for svc in to_start for p in _ports_of(svc)
            if not port_free(s.host, s.ports[p])]
    if busy:
        raise StackError(f"port(s) in use: {', '.join(busy)}; stop what holds them or set "
                         "METHODLAB_STACK_*_PORT (see infra/local/stack.py)")
    _save_state(s)
    started = []
    t0 = time.monotonic()
    try:
        # The three start independently (MLflow touches S3 only when artifacts are written), so
        # they start in parallel; S3 is awaited first because its buckets are created right away.
        pids = {svc: SPAWNERS[svc](s) for svc in to_start}
        for svc in to_start:
            for attempt in range(1, START_ATTEMPTS[svc] + 1):
                try:
                    wait_healthy(s, svc, pids[svc], START_TIMEOUT[svc])
                    break
                except StackError as e:
                    if attempt == START_ATTEMPTS[svc]:
                        raise
                    print(f"{svc}: start-up failed ({e}); retrying", file=sys.stderr)
                    stop_service(s, svc)
                    pids[svc] = SPAWNERS[svc](s)
            if svc == "s3":
                create_buckets(s)
            started.append(f"{svc} {time.monotonic() - t0:.1f}s")
    except BaseException:
        for svc in reversed(to_start):
            stop_service(s, svc)
        raise
    for svc in SERVICES:
        if not healthy(s, svc):
            raise StackError(f"{svc} is running but not healthy; see {s.log_file(svc)} or run down.sh")
    env_file = s.dir / "env.sh"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in s.client_env().items()))
    env_file.chmod(0o600)
    print(f"methodlab stack is up ({'started ' + ', '.join(started) if started else 'already running'}); "
          f"state in {s.dir}")
    print(f"  Ray job server + dashboard  {s.url('dashboard')}   (token auth on; token file {s.token_file})")
    print(f"  MLflow tracking server      {s.url('mlflow')}   (SQLite backend, artifacts in "
          f"s3://{s.mlflow_bucket}/artifacts)")
    print(f"  S3 endpoint (moto)          {s.url('s3')}   (buckets {s.bucket}, {s.mlflow_bucket}; in memory)")
    print("Use it from a shell:")
    print(f"  source {env_file}")
    for k, v in s.client_env().items():
        shown = "<local dummy>" if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") else v
        print(f"    {k}={shown}")
    print("  ray job submit --working-dir . -- python jobs/train.py supervised -c jobs/configs/supervised.yaml \\")
    print(f"      storage.path=s3://{s.bucket}/runs tracking.uri={s.url('mlflow')}")


def down(s: Settings) -> None:
    if not s.dir.exists():
        print(f"methodlab stack: nothing to stop ({s.dir} does not exist)")
        return
    saved = _load_state(s)
    if saved:
        s.ports.update(saved["ports"])
    report = []
    for svc in [*node_services(s), *reversed(SERVICES)]:
        n = stop_service(s, svc)
        report.append(f"{svc} ({n} processes)" if n else f"{svc} (not running)")
    print(f"methodlab stack is down: {', '.join(report)}; logs and the MLflow database stay in {s.dir}")


def status(s: Settings) -> int:
    saved = _load_state(s)
    if saved:
        s.ports.update(saved["ports"])
    ok = True
    for svc in SERVICES:
        run, heal = running(s, svc), healthy(s, svc)
        ok &= run and heal
        where = s.url({"s3": "s3", "mlflow": "mlflow", "ray": "dashboard"}[svc])
        print(f"{svc:7s} {'running' if run else 'stopped':8s} {'healthy' if heal else 'unhealthy':10s} {where}")
    return 0 if ok else 3


def _state_file(s: Settings) -> Path:
    return s.dir / "stack.json"


def _load_state(s: Settings) -> dict | None:
    try:
        return json.loads(_state_file(s).read_text())
    except (OSError, ValueError):
        return None


def _save_state(s: Settings) -> None:
    _state_file(s).write_text(json.dumps({"host": s.host, "ports": s.ports, "bucket": s.bucket,
                                          "mlflow_bucket": s.mlflow_bucket}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env", "add-node"])
    p.add_argument("--cpus", type=int, default=1, help="add-node: the new node's CPUs")
    p.add_argument("--resources", type=json.loads, default={},
                   help='add-node: custom resources as JSON, e.g. \'{"node_b": 1}\'')
    args = p.parse_args(argv)
    try:
        s = Settings.from_env()
        if args.command == "up":
            up(s)
        elif args.command == "down":
            down(s)
        elif args.command == "status":
            return status(s)
        elif args.command == "add-node":
            print(f"started Ray node {add_node(s, args.cpus, args.resources)} (stopped by down.sh)")
        else:
            saved = _load_state(s)
            if saved:
                s.ports.update(saved["ports"])
            print("".join(f"export {k}={v}\n" for k, v in s.client_env().items()), end="")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
