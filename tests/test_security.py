"""Credentials never reach logs, MLflow params, tags or artifacts; pickled code is never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methodlab.errors import ConfigError
from tests.conftest import FAKE_SECRET


class Exploit:
    """Unpickling this runs code: exactly what weights_only refuses."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_model_file_is_refused(tmp_path):
    from methodlab.models.hub import load_pretrained

    marker = tmp_path / "pwned"
    torch.save({"spec": {"arch": "cnn", "kwargs": {}}, "state_dict": Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="is not a weights-only methodlab model file"):
        load_pretrained(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_malicious_checkpoint_is_refused(tmp_path):
    from methodlab.train.core import LoopState

    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    torch.save({"stage_index": Exploit(marker)}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        LoopState.load(str(tmp_path / "ckpt"))
    assert not marker.exists()


@pytest.mark.slow
def test_no_credentials_in_logs_params_or_artifacts(ray_cluster, home, tmp_path):
    from methodlab.config import load_config
    from methodlab.tracking import Tracker
    from methodlab.train.launch import train

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET          # the cluster's workers have it too
    cfg = load_config("supervised", None, ["train.epochs=1", "train.run_name=secrets"])
    summary = train(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.client.get_run(summary.run_id)
    texts = [str(run.data.params), str(run.data.tags), str(run.data.metrics)]
    artifacts = Path(tracker.client.download_artifacts(summary.run_id, "", str(tmp_path / "art")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    files += [p for p in Path(cfg.storage.path, "secrets").rglob("*") if p.is_file()]
    logs = Path(os.environ["RAY_TMPDIR"]) / "session_latest" / "logs"
    files += [p for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert files, "nothing was scanned"
    for p in files:
        data = p.read_bytes()
        assert FAKE_SECRET.encode() not in data, f"secret found in {p}"
    for t in texts:
        assert FAKE_SECRET not in t


SECRET = "hunter2"


@pytest.mark.parametrize("text,shown", [
    ("postgresql://user:hunter2@db:5432/mlflow", "postgresql://user:***@db:5432/mlflow"),
    ("tracking.uri http://admin:hunter2@host:5000 is unreachable", "tracking.uri http://admin:***@host:5000 is unreachable"),
    ("s3://AKIAX:hunter2@bucket/runs", "s3://AKIAX:***@bucket/runs"),
    ("https://host/x?token=hunter2&experiment=3", "https://host/x?token=***&experiment=3"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=hunter2&X-Amz-Signature=hunter2",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("http://host:5000/api?api_key=hunter2", "http://host:5000/api?api_key=***"),
    # Nothing secret: unchanged.
    ("http://host:5000/#/experiments/3?searchFilter=x", "http://host:5000/#/experiments/3?searchFilter=x"),
    ("train.lr=0.1 set in c.yaml", "train.lr=0.1 set in c.yaml"),
])
def test_redact_masks_userinfo_and_secret_query_parameters(text, shown):
    from methodlab.redact import redact_value

    assert redact_value(text) == shown


def test_every_methodlab_error_is_redacted():
    """Wherever an error is shown (the CLI's line, a traceback, a Ray worker's log), it has no
    password: the message is redacted when the error is made, and survives pickling (Ray)."""
    import pickle

    from methodlab.errors import ServiceError

    e = ServiceError(f"MLflow tracking server http://u:{SECRET}@h is unreachable")
    assert SECRET not in str(e) and SECRET not in str(pickle.loads(pickle.dumps(e)))


def test_a_bugs_traceback_is_redacted(monkeypatch, capsys):
    """Not bad input but a bug: the CLI shows the traceback (exit 1), its URIs redacted."""
    from methodlab import cli

    def bug(args):
        raise RuntimeError(f"could not open postgresql://user:{SECRET}@db/mlflow")

    monkeypatch.setattr(cli, "_methods", bug)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "postgresql://user:***@db/mlflow" in err and SECRET not in err


@pytest.fixture
def auth_server():
    """A tracking server's /health behind Basic auth (as MLflow's basic-auth app or a proxy puts
    it): 200 for user:hunter2, 401 otherwise. Yields the port and the Authorization headers seen."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []
    good = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200 if self.path == "/health" and seen[-1] == good else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def test_reachability_check_uses_the_uris_credentials_without_showing_them(auth_server):
    from methodlab.errors import ServiceError
    from methodlab.tracking import check_reachable

    port, seen = auth_server
    check_reachable(f"http://user:{SECRET}@127.0.0.1:{port}")        # healthy: no error
    assert seen[-1].startswith("Basic ")
    with pytest.raises(ServiceError) as refused:
        check_reachable(f"http://user:wrong-{SECRET}@127.0.0.1:{port}")
    assert str(refused.value) == (f"MLflow server http://user:***@127.0.0.1:{port} answered /health with 401; "
                                  "check it (401/403: check the credentials)")


def test_sync_never_shows_the_spooled_uris_password(home, tmp_path, capsys):
    import socket

    from methodlab.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "r1.jsonl").write_text(json.dumps(
        {"uri": f"http://user:{SECRET}@127.0.0.1:{port}", "run_id": "r1", "step": 0, "metrics": {"a": 1.0}}) + "\n")
    assert main(["sync", "--spool", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert f"still unreachable: http://user:***@127.0.0.1:{port}" in out.out
    assert SECRET not in out.out + out.err


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only(tmp_path):
    """What `methodlab train` starts when RAY_ADDRESS is unset (preflight, then `ensure_ray`):
    every listener of every process it starts (GCS, raylet, agents, dashboard, workers, the
    driver's core worker) is on 127.0.0.1, with tasks running on two workers. Preflight must not
    import ray: the loopback mode is read when ray is imported."""
    from tests.conftest import ROOT

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        "from methodlab.config import load_config\n"
        "from methodlab.train.launch import ensure_ray, preflight\n"
        "from tests.listeners import descendants, listening, off_loopback\n"
        "preflight(load_config('supervised'))\n"
        "assert 'ray' not in sys.modules, 'preflight imported ray'\n"
        "ensure_ray(num_cpus=2)\n"
        "import ray\n"
        "@ray.remote\n"
        "def pid():\n"
        "    return os.getpid()\n"
        "workers = set(ray.get([pid.remote() for _ in range(4)]))\n"
        "procs = descendants(os.getpid())\n"
        "print(json.dumps({'workers': sorted(workers), 'in_tree': sorted(workers & procs),\n"
        "                  'listeners': len(listening(procs)),\n"
        "                  'exposed': [f'{a}:{p}' for (a, p) in off_loopback(procs)]}))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(ROOT) / "platform"), ROOT])
    out = subprocess.run([sys.executable, str(probe)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["workers"] and seen["in_tree"] == seen["workers"]      # the scan covered the workers
    assert seen["listeners"] >= 5, seen                                 # ... and found Ray's servers
    assert seen["exposed"] == [], seen
