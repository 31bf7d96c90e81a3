"""The tracking server goes away mid-run: metrics are spooled locally and written when it is back
(or by `methodlab sync`), never dropped and never duplicated. Uses a real MLflow server."""

from __future__ import annotations

import threading
import time

import pytest

from methodlab.cli import main
from methodlab.tracking import MetricSpool, Tracker


@pytest.mark.slow
def test_metrics_survive_a_server_outage_and_sync_replays_them(mlflow_server, tmp_path, capsys):
    tracker = Tracker(mlflow_server.uri, "outage")
    run_id = tracker.start_run("outage-run", {"a": "1"}, {}, "a: 1\n")
    spool = MetricSpool(tracker, run_id, tmp_path / "spool")
    assert spool.log({"loss": 0.5}, 10, 1)

    mlflow_server.stop()
    t0 = time.time()
    assert not spool.log({"loss": 0.4}, 20, 2)       # training goes on
    assert not spool.log({"loss": 0.3}, 30, 3)
    assert time.time() - t0 < 30, "a dead tracking server must not stall training"
    assert spool.path.exists() and len(spool.path.read_text().splitlines()) == 2   # the unsent epochs

    mlflow_server.start()
    assert main(["sync", "--spool", str(tmp_path / "spool")]) == 0
    assert "synced to" in capsys.readouterr().out
    history = Tracker(mlflow_server.uri, None).client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 0.5), (20, 0.4), (30, 0.3)]
    assert not spool.path.exists()
    assert main(["sync", "--spool", str(tmp_path / "spool")]) == 0     # nothing left: a no-op


@pytest.mark.slow
def test_spool_flush_when_server_returns_writes_each_step_once(mlflow_server, tmp_path):
    tracker = Tracker(mlflow_server.uri, "returns")
    run_id = tracker.start_run("r", {}, {}, "x: 1\n")
    spool = MetricSpool(tracker, run_id, tmp_path)
    mlflow_server.stop()
    for epoch in range(1, 4):
        spool.log({"acc": epoch / 10}, 10 * epoch, epoch)
    mlflow_server.start()
    assert spool.log({"acc": 0.4}, 40, 4)     # the next epoch's write flushes the backlog
    steps = [m.step for m in Tracker(mlflow_server.uri, None).client.get_metric_history(run_id, "acc")]
    assert sorted(steps) == [10, 20, 30, 40]


def test_lines_appended_while_a_flush_is_sending_are_kept(tmp_path):
    """The training thread appends each epoch's line while the MLflow thread flushes the ones
    before it (train/loop.py): a line appended during a send must stay for the next flush.
    (A flush that removed the whole file after sending lost such epochs; seen in CI as an
    epoch missing from a run's history.)"""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "concurrent")
    run_id = tracker.start_run("r", {}, {}, "x: 1\n")
    spool = MetricSpool(tracker, run_id, tmp_path / "spool")
    epochs = 60
    appended = threading.Event()

    def train():
        for epoch in range(1, epochs + 1):
            spool.append({"loss": 1.0 / epoch}, 7 * epoch, epoch)
            time.sleep(0.002)
        appended.set()

    trainer = threading.Thread(target=train)
    trainer.start()
    while not appended.is_set():
        spool.flush()
    trainer.join()
    assert spool.flush() and not spool.path.exists()
    steps = [m.step for m in tracker.client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == [7 * e for e in range(1, epochs + 1)]
    assert tracker.logged_epochs(run_id) == {e: 7 * e for e in range(1, epochs + 1)}
