"""The fault matrix: external faults against real runs (a real local Ray cluster, a real MLflow
store, real S3 where named), each ending with the run resumable and, resumed, bit-identical to a
run that never stopped, in one MLflow run with every epoch step once.

    fault                                   test
    two submissions of one run name         test_lease_*, test_signal_*  (the second is refused)
    a driver that died holding the lease    test_lease_is_taken_over_once_its_heartbeat_is_stale
    a truncated latest checkpoint           test_truncated_latest_checkpoint_*
    SIGINT / SIGTERM of the driver's group  test_signal_*
    disk full under storage.path            test_disk_full_*  (a small tmpfs; skipped without root)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from methodlab import storage
from methodlab.cli import main
from methodlab.config import load_config
from methodlab.errors import ConfigError, TrainingError
from methodlab.tracking import Tracker
from methodlab.train.checkpoints import CHECKPOINT_PREFIX, MANIFEST_FILE, SET_ASIDE, SNAPSHOT_FILE
from methodlab.train.core import STATE_FILE, read_checkpoint
from methodlab.train.lease import LEASE_FILE, Lease
from methodlab.train.signals import SIGNALS, Interrupted, stop_on_signals
from tests.conftest import epochs_logged
from tests.test_train import _weights

# `make test-faults` (its own target: minutes on 2 CPUs); `make test` leaves it out.
pytestmark = pytest.mark.faults

EPOCHS = 30      # (long enough that a driver is still training when the signal comes)
BASE = [f"train.epochs={EPOCHS}", "train.batch_size=64", "data.limit_rows=512", "scaling.num_workers=2"]


# ----------------------------------------------------------------------------------------------
# The lease, on a local path and on S3 (no Ray)


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "runs" / "r")
    endpoint, name = request.getfixturevalue("bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.configure(None)
    return f"s3://{name}/runs/r"


def test_lease_refuses_a_second_holder_in_one_line_until_released(prefix):
    first = Lease(prefix, "run", "r", timeout_s=30)
    first.acquire()
    try:
        with pytest.raises(ConfigError) as refused:
            Lease(prefix, "run", "r", timeout_s=30).acquire()
        line = str(refused.value)
        assert "\n" not in line
        assert line.startswith("run r is already running: leased by ") and " since 20" in line, line
        # (a second or so on a loaded machine, with S3 behind it)
        assert first.holder["host"] in line and re.search(r"last heartbeat [0-9]s ago", line), line
    finally:
        first.release()
    assert not storage.exists(f"{prefix}/{LEASE_FILE}")
    with Lease(prefix, "run", "r", timeout_s=30):       # free again
        pass


def test_lease_heartbeat_keeps_it_and_a_stale_one_is_taken_over(prefix):
    lines = []
    live = Lease(prefix, "run", "r", timeout_s=0.6)
    live.acquire()
    time.sleep(1.5)                       # past the timeout: only the heartbeat keeps it
    with pytest.raises(ConfigError, match="already running"):
        Lease(prefix, "run", "r", timeout_s=0.6).acquire()
    live._stop.set()                      # the driver hangs or its host is lost: no heartbeats, no release
    live._thread.join()
    time.sleep(1.0)
    taker = Lease(prefix, "run", "r", timeout_s=0.6, log=lambda line, **_: lines.append(line))
    taker.acquire()
    taker.release()
    assert len(lines) == 1 and lines[0].startswith("[r] took over the lease of ") and \
        ": its last heartbeat was 1s ago (over train.lease_timeout_s=0.6)" in lines[0], lines


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(prefix):
    """A driver killed with SIGKILL: its resubmission on the same host need not wait out the timeout."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lines = []
    killed = Lease(prefix, "run", "r", timeout_s=300)
    killed.holder["pid"] = dead.pid
    killed.acquire()
    killed._stop.set()
    taker = Lease(prefix, "run", "r", timeout_s=300, log=lambda line, **_: lines.append(line))
    taker.acquire()
    taker.release()
    assert len(lines) == 1 and f": its process {dead.pid} on this host is gone" in lines[0], lines


def test_a_signal_with_stop_asks_it_once_and_a_second_one_exits_at_once():
    """A sweep's first SIGTERM or SIGINT goes to `stop` (as Tune's handler does, it puts back the
    SIGINT handler it found), nothing is raised; the second signal ends the process with 128 + its
    number, even though that handler was put back."""
    code = textwrap.dedent("""
        import os, signal, time
        from methodlab.train.signals import stop_on_signals
        asked = []
        def tune_like(signum):
            asked.append(signum)
            signal.signal(signal.SIGINT, found)
            return True
        with stop_on_signals(tune_like) as fired:
            found = signal.getsignal(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print(fired, asked, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        print("not reached", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert out.stdout.split("\n")[:2] == [f"[{int(signal.SIGTERM)}] [{int(signal.SIGTERM)}]", ""], out.stdout


def test_a_signal_whose_stop_cannot_stop_anything_yet_raises_interrupted():
    session = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        with pytest.raises(Interrupted) as stopped:
            with stop_on_signals(lambda signum: False) as fired:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert stopped.value.exit_code == 143 and fired == [signal.SIGTERM]
    finally:              # (the handler of a second signal stays: put the test session's back)
        for s, handler in session.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The weights of the run that never stopped (its own METHODLAB_HOME), for every test here."""
    from methodlab.train.launch import ensure_ray, train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METHODLAB_HOME", str(tmp_path_factory.mktemp("straight") / "home"))
        ensure_ray(num_cpus=2)
        cfg = load_config("supervised", None, [*BASE, "train.run_name=straight"])
        summary = train(cfg)
        return _weights(cfg, summary.run_id)


def _assert_resumed_like_straight(cfg, run_id: str, straight: dict) -> None:
    """One MLflow run, FINISHED, every epoch step once, and the weights of the straight run."""
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id])
            if r.info.run_name == cfg.run_name] == [run_id]
    for key in ("val_acc", "train_loss"):
        assert epochs_logged(tracker.client, run_id, key) == list(range(1, EPOCHS + 1)), key
    resumed = _weights(cfg, run_id)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), f"{k} differs after resume"


def _run_dir(cfg) -> Path:
    return Path(cfg.storage.path) / cfg.run_name


def _snapshot(cfg) -> dict:
    return json.loads((_run_dir(cfg) / SNAPSHOT_FILE).read_text())


def _assert_no_orphans(cfg) -> None:
    listed = {r["checkpoint_dir_name"] for r in _snapshot(cfg)["checkpoint_results"]}
    folders = {p.name for p in _run_dir(cfg).iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)}
    assert folders == listed, f"folders {sorted(folders)}, Ray lists {sorted(listed)}"


@pytest.mark.slow
def test_truncated_latest_checkpoint_resumes_from_the_one_before(ray_cluster, home, monkeypatch, straight, capsys):
    from methodlab.train.launch import train

    cfg = load_config("supervised", None, [*BASE, "train.run_name=truncated"])
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_after_epoch=4")
    with pytest.raises(TrainingError, match="run truncated failed"):
        train(cfg)
    monkeypatch.delenv("METHODLAB_FAULTS")
    snap = _snapshot(cfg)
    latest = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert len(snap["checkpoint_results"]) >= 2
    for name in (r["checkpoint_dir_name"] for r in snap["checkpoint_results"]):
        assert (_run_dir(cfg) / name / MANIFEST_FILE).exists()
    state = _run_dir(cfg) / latest / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])    # a disk that filled up
    orphan = _run_dir(cfg) / f"{CHECKPOINT_PREFIX}2000-01-01_00-00-00.000000"   # an upload cut short
    orphan.mkdir()
    (orphan / STATE_FILE).write_bytes(b"half")
    capsys.readouterr()

    resumed = train(load_config("supervised", None, [*BASE, "train.run_name=truncated"]))
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if "is unusable" in line]
    assert len(bad) == 1 and f"{latest} is unusable: {STATE_FILE} has " in bad[0] and \
        f"moved to {_run_dir(cfg)}/{SET_ASIDE}/{latest}" in bad[0], out
    assert (_run_dir(cfg) / SET_ASIDE / latest / STATE_FILE).exists()       # moved aside, never deleted
    assert resumed.resumed
    _assert_resumed_like_straight(cfg, resumed.run_id, straight)
    _assert_no_orphans(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_driver_kills_the_run_keeps_its_checkpoint_and_it_resumes(ray_cluster, home, straight, signum,
                                                                                 tmp_path, capsys):
    """The driver (`methodlab train`, its own process group, on the session's cluster) is
    signalled once it has a checkpoint; meanwhile a second submission of the name is refused."""
    from methodlab.train.launch import train

    name = f"signal-{signum}"
    args = ["train", "supervised", *BASE, f"train.run_name={name}"]
    cfg = load_config("supervised", None, args[2:])
    os.environ["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    try:
        log = tmp_path / "driver.err"
        with open(log, "w") as err_file:     # (a file, not a pipe: Ray's log lines must never block it)
            driver = subprocess.Popen([sys.executable, "-m", "methodlab.cli", *args], start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=err_file)
        deadline = time.monotonic() + 240
        while not ((_run_dir(cfg) / SNAPSHOT_FILE).exists() and _snapshot(cfg)["latest_checkpoint_result"]):
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        capsys.readouterr()
        assert main(args) == 2            # (in-process: refused in well under a second)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: run {name} is already running: leased by "), lines
        os.killpg(driver.pid, signum)
        driver.wait(timeout=120)
    finally:
        del os.environ["RAY_ADDRESS"]
    err = log.read_text()
    assert driver.returncode == 128 + signum, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: run {name} interrupted by {signal.Signals(signum).name}: workers stopped"), err
    kept = re.search(r"; last checkpoint (\S+);", errors[0])
    assert kept and kept.group(1).startswith(f"{_run_dir(cfg)}/{CHECKPOINT_PREFIX}"), err
    assert read_checkpoint(kept.group(1))["history_step"] < EPOCHS       # stopped mid-run, checkpoint kept
    assert "resume with: methodlab train supervised " in errors[0] and f"train.run_name={name}" in errors[0], err
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    killed = tracker.find_run(name)
    assert killed.status == "KILLED"
    assert not (_run_dir(cfg) / LEASE_FILE).exists()

    resumed = train(cfg)
    assert resumed.run_id == killed.run_id and resumed.resumed
    _assert_resumed_like_straight(cfg, resumed.run_id, straight)
    _assert_no_orphans(cfg)


def _mount_small_tmpfs(path: Path, size: str) -> None:
    """A tmpfs of `size` at `path` that the session's Ray workers see too, or skip: that needs root
    (or `sudo -n`); a user-namespace mount (`unshare -rm`) would be visible to its own processes
    only, not to the workers of a cluster started outside it."""
    path.mkdir()
    if os.geteuid() == 0:
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    elif subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        command = ["sudo", "-n", "mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path)]
    else:
        pytest.skip("disk full: mounting a small tmpfs needs root or passwordless sudo; a user-namespace tmpfs "
                    "(unshare -rm) is not seen by the Ray workers")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"disk full: cannot mount a tmpfs here ({done.stderr.strip()[:200]})")


def _fill(path: Path) -> Path:
    """Write zeros into `path/ballast` until the filesystem is full."""
    ballast = path / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(2**20))
        except OSError as e:
            assert e.errno == 28, e        # ENOSPC
    return ballast


@pytest.mark.slow
def test_disk_full_fails_in_one_line_keeps_the_last_good_checkpoint_and_resumes(ray_cluster, home, straight, tmp_path):
    """storage.path on a 64 MB tmpfs, filled up once the run has checkpoints: the run fails in one
    line and is marked FAILED, its last good checkpoint stays; with space freed the same command
    resumes to the weights of a run that never stopped."""
    import threading

    from methodlab.train.launch import train

    small = tmp_path / "small"
    _mount_small_tmpfs(small, "64m")
    try:
        args = [*BASE, "train.run_name=diskfull", f"storage.path={small}"]
        cfg = load_config("supervised", None, args)
        filled: list[Path] = []

        def fill_after_two_checkpoints():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not filled:
                try:
                    if len(_snapshot(cfg)["checkpoint_results"]) >= 2:
                        filled.append(_fill(small))
                except (OSError, ValueError, KeyError):     # no snapshot yet, or one being written
                    pass
                time.sleep(0.1)
        filler = threading.Thread(target=fill_after_two_checkpoints, daemon=True)
        filler.start()
        with pytest.raises(TrainingError) as failed:
            train(cfg)
        filler.join()
        line = str(failed.value)
        assert filled and "\n" not in line and line.startswith("run diskfull failed: "), line
        assert "No space left on device" in line or "Errno 28" in line, line
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        assert tracker.find_run("diskfull").status == "FAILED"
        kept = _snapshot(cfg)["latest_checkpoint_result"]["checkpoint_dir_name"]
        assert read_checkpoint(str(_run_dir(cfg) / kept))["history_step"] < EPOCHS
        assert not (_run_dir(cfg) / LEASE_FILE).exists()

        filled[0].unlink()                                                   # space freed
        resumed = train(load_config("supervised", None, args))
        assert resumed.resumed
        _assert_resumed_like_straight(cfg, resumed.run_id, straight)
        _assert_no_orphans(cfg)
    finally:
        subprocess.run(["umount", "-l", str(small)] if os.geteuid() == 0 else ["sudo", "-n", "umount", "-l", str(small)],
                       capture_output=True)


@pytest.mark.slow
def test_with_another_ray_on_the_host_the_placement_group_cleaner_asks_its_own(ray_cluster):
    """Ray Train's placement-group cleaner asks the state API whether its controller lives. With a
    second Ray instance on the host (the test session's), a worker of the local Ray a run starts
    (`ensure_ray`) gets its answer from its own cluster: no "Found multiple active Ray instances",
    and a live actor is alive, a gone one is not (the cleaner removes its placement group)."""
    code = textwrap.dedent("""
        import json
        import ray
        from ray._private.services import find_gcs_addresses
        from methodlab.train.launch import ensure_ray

        ensure_ray(num_cpus=1)

        @ray.remote(num_cpus=0)
        class Controller:
            def ping(self):
                return 1

        @ray.remote(num_cpus=0)
        def alive(actor_id):
            from ray.train.v2._internal.state.util import is_actor_alive   # [ray] the cleaner's question
            return bool(is_actor_alive(actor_id, timeout=20))

        live, gone = Controller.remote(), Controller.remote()
        ray.get([live.ping.remote(), gone.ping.remote()])
        ray.kill(gone)
        print(json.dumps({"instances": len(find_gcs_addresses()),
                          "alive": ray.get([alive.remote(a._actor_id.hex()) for a in (live, gone)])}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Found multiple active Ray instances" not in out.stdout + out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["instances"] >= 2 and seen["alive"] == [True, False], seen
