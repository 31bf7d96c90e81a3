"""Integration: the shared loop on a real local Ray cluster with a real MLflow store."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import ray.exceptions
import torch
from hypothesis import given, settings, strategies as st

from methodlab.config import load_config
from methodlab.errors import ConfigError, TrainingError
from methodlab.train.faults import Faults
from methodlab.tracking import Tracker
from tests.conftest import epochs_logged

BASE = ["train.epochs=3", "train.batch_size=64", "scaling.num_workers=2"]


def _weights(cfg, run_id):
    from methodlab.models.hub import load_pretrained

    model, _ = load_pretrained(f"runs:/{run_id}", cfg.tracking.uri)
    return model.state_dict()


@pytest.mark.slow
def test_interrupted_run_resumes_in_the_same_mlflow_run_with_identical_weights(ray_cluster, home, monkeypatch):
    from methodlab.train.launch import train

    straight_cfg = load_config("supervised", None, [*BASE, "train.run_name=straight"])
    straight = train(straight_cfg)

    crash_cfg = load_config("supervised", None, [*BASE, "train.run_name=interrupted"])
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_after_epoch=1")
    with pytest.raises(TrainingError, match="run interrupted failed"):
        train(crash_cfg)
    monkeypatch.delenv("METHODLAB_FAULTS")
    tracker = Tracker(crash_cfg.tracking.uri, crash_cfg.tracking.experiment)
    failed = tracker.find_run("interrupted")
    assert failed.status == "FAILED"

    resumed = train(load_config("supervised", None, [*BASE, "train.run_name=interrupted"]))
    assert resumed.run_id == failed.run_id and resumed.resumed and resumed.status == "FINISHED"
    run = tracker.client.get_run(resumed.run_id)
    assert run.data.tags["methodlab.resumed_at_epoch"] == "1"
    for key in ("val_acc", "train_loss"):
        assert epochs_logged(tracker.client, resumed.run_id, key) == [1, 2, 3], key
    # each at the global step at its end, as in the run that never stopped; no epoch/step metrics
    assert tracker.logged_epochs(resumed.run_id) == tracker.logged_epochs(straight.run_id)
    assert not {"epoch", "step"} & set(run.data.metrics)
    a, b = _weights(straight_cfg, straight.run_id), _weights(crash_cfg, resumed.run_id)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed.metrics["test_acc"] == straight.metrics["test_acc"]

    # The same run submitted once more is already finished: nothing runs, nothing is registered.
    again = train(load_config("supervised", None, [*BASE, "train.run_name=interrupted"]))
    assert again.already_finished and again.version == resumed.version
    # ... but the same name with other training values is refused, not answered with the old result
    # (keys that do not change what is trained, like train.max_failures, do not count).
    with pytest.raises(ConfigError, match=r"^run interrupted already finished with other values of "
                                          r"train\.epochs, train\.lr; set a new train\.run_name"):
        train(load_config("supervised", None, [*BASE, "train.run_name=interrupted", "train.epochs=5",
                                               "train.lr=0.5", "train.max_failures=3"]))


@pytest.mark.slow
def test_a_run_resumes_on_another_worker_count_and_records_each_attempts(ray_cluster, home, monkeypatch, capsys):
    """The derived name leaves scaling out, so a run interrupted on 2 workers resumes on 1: in the
    same MLflow run, every epoch logged once, the worker count of each attempt in a tag."""
    from methodlab.train.launch import train

    overrides = ["train.epochs=3", "train.batch_size=64"]
    two = load_config("supervised", None, [*overrides, "scaling.num_workers=2"])
    one = load_config("supervised", None, [*overrides, "scaling.num_workers=1"])
    assert two.run_name == one.run_name
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_after_epoch=1")
    with pytest.raises(TrainingError, match=f"run {two.run_name} failed"):
        train(two)
    monkeypatch.delenv("METHODLAB_FAULTS")
    resumed = train(one)
    assert resumed.resumed and resumed.status == "FINISHED"
    assert f"[{one.run_name}] resuming on 1 workers (the last attempt ran on 2)" in capsys.readouterr().out
    tracker = Tracker(one.tracking.uri, one.tracking.experiment)
    run = tracker.client.get_run(resumed.run_id)
    assert run.data.tags["methodlab.workers_per_attempt"] == "2 1"
    assert epochs_logged(tracker.client, resumed.run_id) == [1, 2, 3]     # once each, steps never going back


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_on_more_workers_logs_each_epoch_once_never_going_back(
        ray_cluster, home, monkeypatch):
    """Checkpoints every 2 epochs: the run dies in epoch 4 on 1 worker (1024 rows: 16 steps an
    epoch), epoch 3 spooled but not checkpointed, and resumes on 2 workers (8 steps an epoch) from
    epoch 2's checkpoint. Epoch 3 runs again and is not logged again: it stays at step 48, as the
    first attempt logged it; epoch 4 ends at global step 32 + 2 x 8 = 48, not past epoch 3's, so
    it is logged one step past it."""
    from methodlab.train.launch import train

    overrides = ["train.epochs=4", "train.batch_size=64", "train.checkpoint_every=2", "data.limit_rows=1024"]
    one = load_config("supervised", None, [*overrides, "scaling.num_workers=1"])
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_after_epoch=3")
    with pytest.raises(TrainingError, match=f"run {one.run_name} failed"):
        train(one)
    monkeypatch.delenv("METHODLAB_FAULTS")
    resumed = train(load_config("supervised", None, [*overrides, "scaling.num_workers=2"]))
    assert resumed.status == "FINISHED"
    tracker = Tracker(one.tracking.uri, one.tracking.experiment)
    assert tracker.client.get_run(resumed.run_id).data.tags["methodlab.resumed_at_epoch"] == "2"
    assert tracker.logged_epochs(resumed.run_id) == {1: 16, 2: 32, 3: 48, 4: 49}
    for key in ("val_acc", "train_loss", "epoch_seconds"):
        assert epochs_logged(tracker.client, resumed.run_id, key) == [1, 2, 3, 4], key


def test_bad_config_is_one_line_non_zero_and_leaves_no_run(home):
    for args, fragment in [(["train.lr=-1"], "train.lr: Input should be greater than 0"),
                           (["data.dataset=/no/such/dataset"], "dataset /no/such/dataset does not exist")]:
        proc = subprocess.run([sys.executable, "-m", "methodlab.cli", "train", "supervised", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert not (home / "runs").exists()
    if (home / "mlflow.db").exists():
        tracker = Tracker(f"sqlite:///{home}/mlflow.db", "methodlab")
        assert tracker.client.search_runs([tracker.experiment_id]) == []


@pytest.mark.slow
@pytest.mark.faults      # an external fault against a real run: make test-faults
def test_worker_crash_is_survived_with_max_failures(ray_cluster, home, monkeypatch):
    """A worker killed mid-epoch, right after a mid-epoch checkpoint (every 4 steps; an epoch has
    9 per worker): the run restarts its workers from it, skips the batches that checkpoint had
    trained, and ends exactly where an uninterrupted run ends, in one MLflow run with no
    duplicated steps. The fault is injected by the test hook, never by a config key (so it is not
    an MLflow param)."""
    from methodlab.train.launch import train

    straight = train(load_config("supervised", None, [*BASE, "train.run_name=straight2"]))
    cfg = load_config("supervised", None, [*BASE, "train.run_name=crashy", "train.max_failures=1",
                                           "train.checkpoint_every_steps=4"])
    monkeypatch.setenv("METHODLAB_FAULTS", "crash_at_step=22")    # epoch 3 (steps 18-26): after step 20's checkpoint
    survived = train(cfg)
    assert survived.status == "FINISHED" and not survived.resumed
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.client.get_run(survived.run_id)
    assert run.data.tags["methodlab.resumed_at_epoch"] == "2"
    faults = {f.name for f in dataclasses.fields(Faults)}
    assert not any(k.rsplit(".", 1)[-1] in faults or "fault" in k for k in run.data.params)
    assert epochs_logged(tracker.client, survived.run_id) == [1, 2, 3]
    a, b = _weights(cfg, straight.run_id), _weights(cfg, survived.run_id)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_non_finite_loss_fails_the_run_keeps_the_checkpoint_registers_nothing(ray_cluster, home, monkeypatch):
    from methodlab.train.launch import train

    cfg = load_config("supervised", None, ["train.epochs=4", "scaling.num_workers=2", "train.run_name=diverges",
                                           "train.log_every_steps=4"])
    monkeypatch.setenv("METHODLAB_FAULTS", "nan_after_epoch=2")
    # Epoch 3 starts at step 18; the first read of its losses is at step 20 (every 4 steps).
    with pytest.raises(TrainingError, match=r"non-finite loss loss=nan in steps 18-19 \(stage train, epoch 3\)"):
        train(cfg)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.find_run("diverges")
    assert run.status == "FAILED"
    assert "methodlab.registered_version" not in tracker.client.get_run(run.run_id).data.tags
    assert tracker.client.search_registered_models(f"name='{cfg.tracking.registered_model}'") == []
    from methodlab.models.hub import latest_checkpoint

    kept = latest_checkpoint(f"{cfg.storage.path}/diverges")
    from methodlab.train.core import LoopState
    assert LoopState.load(kept).history_step == 2          # the last good epoch's checkpoint


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), bs=st.integers(1, 9))
def test_stream_chunks_give_every_row_once_in_batches_of_at_most_bs(sizes, bs):
    """The stream loader's batching: each chunk's rows come out once each, in order (Ray Data
    shuffled them), in batches of at most bs; only a trailing batch of one row per chunk is
    dropped (BatchNorm cannot train on it; Ray's chunks are multiples of bs but the last)."""
    import numpy as np

    from methodlab.train.core import chunk_minibatches

    starts = np.cumsum([0, *sizes])
    chunks = [{"x": np.arange(a, b, dtype=np.float32)[:, None], "label": np.arange(a, b)}
              for a, b in zip(starts, starts[1:])]
    batches = list(chunk_minibatches(iter(chunks), bs, torch.device("cpu")))
    assert all(1 <= len(b["label"]) <= bs for b in batches)
    assert all(torch.equal(b["x"][:, 0].long(), b["label"]) for b in batches)
    seen = torch.cat([b["label"] for b in batches]).tolist()
    dropped = sum(1 for n in sizes if n % bs == 1 and n > 1)
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == sum(sizes) - dropped


def _console(env: dict, *args: str) -> tuple[str, list[str], list[str]]:
    """(run name, the run's own lines, every other line) of `methodlab train supervised *args`,
    stdout and stderr together, without Ray's "(Actor pid=...)" prefixes."""
    proc = subprocess.run([sys.executable, "-m", "methodlab.cli", "train", "supervised", *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [re.sub(r"^(\x1b\[\d+m)?\(\w+ pid=\d+[^)]*\)(\x1b\[0m)? ", "", ln)
             for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    name = re.search(r"^\[([\w.-]+)\] supervised on ", "\n".join(lines), re.M).group(1)
    own = [ln for ln in lines if ln.startswith((f"[{name}]", f"{name}:"))]
    return name, own, [ln for ln in lines if ln not in own]


@pytest.mark.slow
@pytest.mark.e2e
def test_the_console_of_a_run_is_the_runs_own_and_verbose_brings_the_rest_back(tmp_path):
    """`methodlab train supervised train.epochs=2` as a new user runs it (a fresh home, no
    RAY_AUTH_MODE): its header, two epoch lines and its summary, last, and nothing else: Ray's,
    Ray Train's and MLflow's lines, the PreemptionWatcher line, matplotlib's and MLflow's
    registration lines are off. With --verbose they are back, and with a small
    train.log_every_s the epochs also print progress lines."""
    import os

    env = {**os.environ, "HOME": str(tmp_path), "METHODLAB_HOME": str(tmp_path / "home")}
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "METHODLAB_VERBOSE", "METHODLAB_LOG_LEVEL"):
        env.pop(k, None)
    name, own, others = _console(env, "train.epochs=2")
    assert others == []
    assert len(own) == 4 and own[-1].startswith(f"{name}: test_acc=") and "first step" in own[1], own
    assert (tmp_path / ".ray" / "auth_token").exists()        # token auth on, as Ray's default is

    name, own, others = _console(env, "train.epochs=2", "train.run_name=verbose-run", "train.log_every_s=0.05",
                                 "train.batch_size=16", "--verbose")
    progress = [ln for ln in own if re.match(rf"^\[{name}\] train epoch [12]: \d+/\d+ steps \(\d+%\)", ln)]
    assert progress and len(own) == 4 + len(progress), own
    for shown in ("Started a local Ray instance", "PreemptionWatcher", "Setting up process group",
                  "Created version '2' of model 'methodlab-supervised'"):
        assert any(shown in ln for ln in others), (shown, others)


class _Recorded:
    """A Loop and its RayHooks as far as `fit_to_end` sees them: what it called, in order."""

    def __init__(self, error: BaseException | None):
        self.error, self.calls = error, []

    def fit(self, state):
        self.calls.append("fit")
        if self.error is not None:
            raise self.error

    def close(self, check: bool = True):
        self.calls.append(f"close(check={check})")

    def finish(self, state):
        self.calls.append("finish")


@pytest.mark.parametrize("error, held", [
    (None, False), (ValueError("a bug"), False), (KeyboardInterrupt(), False),
    # Ray Train's SynchronizationActor, killed in a teardown just before this worker's own kill
    (ray.exceptions.ActorDiedError(), True),
])
def test_a_worker_holds_back_only_a_dead_actors_error_for_its_own_kill(error, held, monkeypatch):
    """An error from an actor the worker waited on is raised only after TEARDOWN_GRACE_S (by
    then a teardown has killed the worker, and Ray Train logs no traceback for it); any other
    error at once; the MLflow writes in flight are waited for first, without raising theirs."""
    from methodlab.train import loop

    slept = []
    monkeypatch.setattr(loop.time, "sleep", slept.append)
    recorded = _Recorded(error)
    if error is None:
        loop.fit_to_end(recorded, None, recorded)
        assert recorded.calls == ["fit", "close(check=True)", "finish"] and not slept
        return
    with pytest.raises(type(error)):
        loop.fit_to_end(recorded, None, recorded)
    assert recorded.calls == ["fit", "close(check=False)"]
    assert slept == ([loop.TEARDOWN_GRACE_S] if held else [])
