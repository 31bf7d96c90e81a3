"""The local stack of infra/local (Ray head and job server, MLflow server, S3) brought up on free
ports in a private directory, as the end-to-end and two-node tests drive it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def stack_module():
    spec = importlib.util.spec_from_file_location("methodlab_stack", ROOT / "infra" / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def stack_env(stack_dir: Path, ports: dict[str, int], home: Path, host: str = "127.0.0.1") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "AWS_", "METHODLAB_STACK_", "MLFLOW_"))}
    env.update({"METHODLAB_STACK_DIR": str(stack_dir), "HOME": str(home), "RAY_TMPDIR": str(stack_dir / "tmp"),
                "METHODLAB_STACK_CPUS": "2", "METHODLAB_STACK_OBJECT_STORE_MB": "400", "RAY_USAGE_STATS_ENABLED": "0"})
    env.update({f"METHODLAB_STACK_{k}_PORT": str(v) for k, v in ports.items()})
    env["METHODLAB_STACK_HOST"] = host
    return env


def free_ports(n: int) -> list[int]:
    """Distinct free loopback ports outside Ray's worker port range."""
    held, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
            port = s.getsockname()[1]
            if not 10002 <= port <= 19999:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


PORT_NAMES = ["S3", "MLFLOW", "DASHBOARD", "RAY", "RAY_CLIENT", "RAY_AGENT"]


def machine_address() -> str | None:
    """This machine's own non-loopback IPv4 address (where a multi-node stack runs), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 9))    # no packet is sent: it only picks the route's source
            candidates = [sock.getsockname()[0]]
        except OSError:
            candidates = []
    try:       # no default route: any address of this host's interfaces
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    return next((a for a in candidates if "." in a and not a.startswith(("127.", "0."))), None)


def bare_python(where: Path) -> Path:
    """A Python whose environment has every dependency but not methodlab: a venv (no pip) whose
    one .pth file names this venv's site-packages. A directory named in a .pth file is put on
    sys.path without its own .pth files being read, so the editable install's hook there
    (`__editable__.methodlab-*.pth`) never runs. Workers on a `rayproject/ray` image are like it."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (where / "lib" / version / "site-packages" / "deps.pth").write_text(site + "\n")
    python = where / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import ray, torch, mlflow; import methodlab"],
                           capture_output=True, text=True, timeout=120)
    assert "No module named 'methodlab'" in probe.stderr, probe.stderr[-1000:]
    return python


class Stack:
    def __init__(self, ray_python: Path | None = None, host: str = "127.0.0.1"):
        self.mod = stack_module()
        self.ports = dict(zip(PORT_NAMES, free_ports(6)))
        self.dir = Path(tempfile.mkdtemp(prefix="mls-"))   # short: Ray's socket paths live under it
        self.home = self.dir / "home-user"
        self.home.mkdir()
        self.host = host
        self.env = stack_env(self.dir / "stack", self.ports, self.home, host)
        if ray_python:
            self.env["METHODLAB_STACK_RAY_PYTHON"] = str(ray_python)

    def api(self, path: str, timeout: float = 30):
        """GET the token-protected job server / state API at `path`, parsed."""
        req = urllib.request.Request(f"{self.url('DASHBOARD')}{path}",
                                     headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def add_node(self, cpus: int, resources: dict[str, float]) -> str:
        """Another Ray node joined to the stack's head (infra/local/stack.py add-node)."""
        proc = subprocess.run([sys.executable, str(ROOT / "infra" / "local" / "stack.py"), "add-node", "--cpus",
                               str(cpus), "--resources", json.dumps(resources)], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()[3]

    def stop_node(self, name: str) -> None:
        """Stop one added node (its raylet, object store and workers) as a lost machine would."""
        import signal

        pid = int((self.dir / "stack" / f"{name}.pid").read_text())
        for p in self.mod.session_members(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (self.dir / "stack" / f"{name}.pid").unlink()

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
                if n["state"] == "ALIVE"]

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.ports[name]}"

    @property
    def token_file(self) -> Path:
        return self.dir / "stack" / "ray_auth_token"

    def script(self, name: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "infra" / "local" / name)], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def client_env(self) -> dict[str, str]:
        """A job-submitting shell: token auth from the file, no cluster address in the environment."""
        return {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def s3_env(self) -> dict[str, str]:
        m = self.mod
        return {"AWS_ENDPOINT_URL": self.url("S3"), "AWS_ACCESS_KEY_ID": m.LOCAL_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": m.LOCAL_SECRET, "AWS_DEFAULT_REGION": m.LOCAL_REGION}

    def s3(self):
        import boto3

        e = self.s3_env()
        return boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"], region_name=e["AWS_DEFAULT_REGION"],
                            aws_access_key_id=e["AWS_ACCESS_KEY_ID"], aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}", timeout=10)["status"]

    def submit(self, submission_id: str, args: list[str], wait: bool, job: str = "train") -> subprocess.CompletedProcess:
        """`methodlab submit <job> supervised <args>` from this checkout (what a user runs)."""
        runtime_env = {"env_vars": {**self.s3_env(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}
        argv = [str(VENV_BIN / "methodlab"), "submit", "--address", self.url("DASHBOARD"),
                "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
                *([] if wait else ["--no-wait"]), job, "supervised", *args]
        return subprocess.run(argv, env=self.client_env(), capture_output=True, text=True, timeout=600)

    def diagnose(self) -> str:
        """What a failed check needs to be understood: is `ray start` alive, and its logs' tails."""
        ray_pid = self.dir / "stack" / "ray.pid"
        lines = [f"ray start alive: {self.mod._alive(int(ray_pid.read_text())) if ray_pid.exists() else 'no pid'}"]
        logs = [self.dir / "stack" / "logs" / "ray.log",
                *sorted((self.dir / "stack" / "ray").glob("session_latest/logs/dashboard*.log")),
                *sorted((self.dir / "stack" / "ray").glob("session_latest/logs/raylet.out")),
                *sorted((self.dir / "stack" / "ray").glob("session_latest/logs/gcs_server.out"))]
        for log in logs:
            tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else ["(missing)"]
            lines += [f"--- {log.name}", *tail]
        return "\n".join(lines)

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def placement_groups(self) -> list[dict]:
        """The cluster's placement groups (Ray's state API over the token-protected job server)."""
        return self.api("/api/v0/placement_groups?limit=1000")["data"]["result"]["result"]

    def actors(self, class_name: str) -> list[dict]:
        """The cluster's actors of `class_name`, dead ones included (with their node ids)."""
        return [a for a in self.api("/api/v0/actors?limit=1000&detail=true")["data"]["result"]["result"]
                if a.get("class_name") == class_name]

    def sessions(self) -> list[int]:
        out = []
        for pid_file in sorted((self.dir / "stack").glob("*.pid")):    # s3, mlflow, ray, added nodes
            out.append(int(pid_file.read_text()))
        return out

    def processes(self, pattern: str) -> list[str]:
        """Live processes of the stack's sessions whose command line matches `pattern`."""
        found = []
        for sid in self.sessions():
            for pid in self.mod.session_members(sid):
                cmd = self.mod._cmdline(pid)
                if re.search(pattern, cmd):
                    found.append(f"{pid} {cmd[:120]}")
        return found

    def leftovers(self) -> list[str]:
        marker = str(self.dir)
        return [f"{p} {self.mod._cmdline(p)[:120]}" for p in self.mod._all_pids()
                if p != os.getpid() and self.mod._alive(p) and marker in self.mod._cmdline(p)]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
