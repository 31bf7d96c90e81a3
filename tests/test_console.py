"""What the console shows (`methodlab.console`, `methodlab.sweep_console`, the MLflow-line capture
in `tracking`): the rules, without a cluster. The real runs are in tests/test_train.py (a run's
console, --verbose, the progress line) and tests/test_sweep.py (a sweep's console)."""

from __future__ import annotations

import io
import re
import sys

import pytest
from hypothesis import given, settings, strategies as st

from methodlab import console
from methodlab.console import KNOWN_HARMLESS, OWN_LINE, ProgressClock, progress_line

EPOCH = "[supervised-sweep-1a2b3c4d-5e6f7_0000{i}] train epoch {e} train_loss=1.{i}48 val_acc=0.{i}003 (0.4s)"
PREEMPTION = ("[2026-12-01 20:21:00,621 E 23837 23872] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '172c995fdeea40c35ebda85401000000' has constructor arguments in the "
              "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
              "lost, the actor restart will fail.")
CLEANER = ("Detected that the Ray Train controller actor (e4c7ef7852602815270e16ce01000000) is dead. Cleaning up "
           "placement group = [PlacementGroupID(82812b15a91ef85f520da45cfa6601000000)] created by this run.")
STARTUP = ("WARNING: 8 PYTHON worker processes have been started on node: 87e37d579a26ceb45c50ca412084772152593f39028c3"
           "0834a662e64 with address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2). This could "
           "be a result of using a large number of actors, or due to tasks blocked in ray.get() calls")
OTHER_ERROR = "[2026-12-01 20:21:00,621 E 23837 23872] core_worker.cc:1234: Failed to connect to the raylet"


@pytest.mark.parametrize("value,on", [("", False), ("0", False), ("false", False), ("No", False),
                                      ("1", True), ("true", True), ("yes", True)])
def test_verbose_brings_the_libraries_lines_back(value, on, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, value)
    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    assert console.verbose() is on
    assert console.library_log_level() == ("INFO" if on else "WARNING")
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "error")
    assert console.library_log_level() == ("INFO" if on else "ERROR")
    assert console.forwarded_env() == {console.LOG_LEVEL_ENV: "error", **({console.VERBOSE_ENV: value} if value else {})}


def _dedup(monkeypatch, verbose: bool, theirs: str | None = None):
    """Ray's own deduplicator of driver output, configured as `configure_ray_logs` sets it up."""
    from ray._private import ray_logging

    monkeypatch.setenv(console.VERBOSE_ENV, "1" if verbose else "0")
    monkeypatch.setattr(console, "_THEIRS", {"RAY_DEDUP_LOGS_SKIP_REGEX": theirs})
    for d in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        monkeypatch.setattr(d, "allow_re", d.allow_re)
        monkeypatch.setattr(d, "skip_re", d.skip_re)
    console.configure_ray_logs()
    d = ray_logging.stdout_deduplicator
    fresh = ray_logging.LogDeduplicator(5, d.allow_re.pattern, d.skip_re.pattern if d.skip_re else None,
                                        _timesource=lambda: 0.0)
    return fresh


def _printed(dedup, batches) -> list[str]:
    out = []
    for pid, lines in batches:
        for batch in dedup.deduplicate({"ip": "127.0.0.1", "pid": pid, "is_err": False, "lines": lines,
                                        "job": "01", "actor_name": None, "task_name": None}):
            out.extend(batch["lines"])
    for batch in dedup.flush():
        out.extend(batch["lines"])
    return out


def test_epoch_lines_of_every_trial_are_never_folded_and_the_known_harmless_line_is_dropped(monkeypatch):
    dedup = _dedup(monkeypatch, verbose=False)
    epochs = [EPOCH.format(i=i, e=e) for e in (1, 2) for i in range(4)]
    printed = _printed(dedup, [(1000 + i, [line]) for i, line in enumerate(epochs)]
                       + [(2000, [PREEMPTION]), (2001, [OTHER_ERROR]), (2002, [CLEANER]), ("raylet", [STARTUP])])
    assert printed == [*epochs, OTHER_ERROR]
    # Without methodlab's pattern Ray folds them: what the allow pattern is there for.
    folded = _printed(type(dedup)(5, None, None, _timesource=lambda: 0.0), [(1000 + i, [ln]) for i, ln in enumerate(epochs)])
    assert len(folded) < len(epochs) and any("repeated" in ln for ln in folded)


def test_configuring_again_gives_the_same_patterns(monkeypatch):
    from ray._private import ray_logging

    first = _dedup(monkeypatch, verbose=False, theirs=r"^noise")
    console.configure_ray_logs()
    assert ray_logging.stdout_deduplicator.allow_re.pattern == first.allow_re.pattern
    assert ray_logging.stdout_deduplicator.skip_re.pattern == first.skip_re.pattern


def test_verbose_keeps_the_known_harmless_line_and_a_users_skip_pattern_stays(monkeypatch):
    _dedup(monkeypatch, verbose=False)       # a quiet run earlier in this process (CI saw its pattern stay)
    assert _printed(_dedup(monkeypatch, verbose=True), [(2000, [PREEMPTION])]) == [PREEMPTION]
    dedup = _dedup(monkeypatch, verbose=False, theirs=r"^noise")
    assert _printed(dedup, [(1, ["noise here"]), (2, [PREEMPTION]), (3, ["signal"])]) == ["signal"]


@pytest.mark.parametrize("line,own", [
    ("[supervised-500c4dde74] train epoch 1 train_loss=1.948 val_acc=0.1003 (1.1s)", True),
    ("[asha4] trial 5e6f7_00001 stopped early at epoch 1: val_acc=0.1003", True),
    ("[2026-12-01 20:21:00,621 E 23837 23872] core_worker.cc:2465: ...", False),
    ("Successfully registered model 'methodlab-supervised'.", False),
])
def test_own_lines_are_told_apart_from_the_libraries(line, own):
    assert bool(re.search(OWN_LINE, line)) is own
    assert not any(re.search(p, line) for p in KNOWN_HARMLESS)
    for harmless in (PREEMPTION, CLEANER, STARTUP):
        assert any(re.search(p, harmless) for p in KNOWN_HARMLESS)


def test_mlflow_registration_lines_are_held_back_and_anything_else_passes(monkeypatch):
    from methodlab.tracking import registry_lines_quieted

    lines = ["Successfully registered model 'methodlab-supervised'.",
             "Registered model 'methodlab-supervised' already exists. Creating a new version of this model...",
             "Created version '3' of model 'methodlab-supervised'.", "WARNING mlflow.models: something to read"]
    for verbose, shown in ((False, lines[3:]), (True, lines)):
        monkeypatch.setenv(console.VERBOSE_ENV, "1" if verbose else "")
        out = io.StringIO()
        monkeypatch.setattr(sys, "stderr", out)
        with registry_lines_quieted():
            for line in lines:
                print(line, file=sys.stderr)
        assert out.getvalue().splitlines() == shown
    # An error inside still raises, and what was printed before it still shows.
    out = io.StringIO()
    monkeypatch.setenv(console.VERBOSE_ENV, "")
    monkeypatch.setattr(sys, "stderr", out)
    with pytest.raises(RuntimeError), registry_lines_quieted():
        print("before the error", file=sys.stderr)
        raise RuntimeError("registry down")
    assert out.getvalue() == "before the error\n"


class StepClock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@settings(max_examples=50, deadline=None)
@given(every=st.floats(0.5, 20), step=st.floats(0.01, 5), readings=st.integers(1, 200))
def test_progress_is_due_once_per_interval_of_wall_clock(every, step, readings):
    clock = StepClock(step)
    progress = ProgressClock(every, clock)
    due = [clock.now for _ in range(readings) if progress.due()]
    gaps = [b - a for a, b in zip([step, *due], due)]
    assert all(g >= every - 1e-9 for g in gaps)
    assert all(g < every + step + 1e-9 for g in gaps)           # never skipped past the next reading
    assert len(due) <= readings * step / every + 1


def test_progress_line_says_how_far_how_fast_and_the_last_losses():
    assert progress_line("sup-1", "train", 3, 450, 1000, 12.5, {"loss": 1.2345}) == \
        "[sup-1] train epoch 3: 450/1000 steps (45%), 12.5 steps/s, ~44s left, loss=1.234"
    assert progress_line("sup-1", "pretune", 1, 5, 0, 0.0, {}) == "[sup-1] pretune epoch 1: 5/0 steps, 0.0 steps/s"
    assert re.search(OWN_LINE, progress_line("sup-1", "train", 1, 1, 2, 1.0, {}))


@settings(max_examples=40, deadline=None)
@given(grace=st.integers(1, 5), rf=st.sampled_from([2, 3, 4]), extra=st.integers(0, 40))
def test_asha_rungs_are_the_schedulers_milestones(grace, rf, extra):
    from ray.tune.schedulers import ASHAScheduler

    from methodlab.sweep_console import asha_rungs

    max_t = grace + extra
    scheduler = ASHAScheduler(time_attr="epoch", grace_period=grace, reduction_factor=rf, max_t=max_t,
                              metric="m", mode="max")
    milestones = sorted(m for m, _ in scheduler._brackets[0]._rungs)  # [ray] its one bracket
    assert asha_rungs(grace, rf, max_t) == milestones


def test_the_status_line_counts_trials_by_how_they_end():
    from ray.tune.experiment import Trial

    from methodlab.sweep_console import TrialEvents, status_line

    events = TrialEvents("asha4", "val_acc", "max")
    events.stopped = {"t2"}
    events.best = (0.95, "t1")
    line = status_line(events, [Trial.RUNNING, Trial.TERMINATED, Trial.TERMINATED, Trial.PENDING, Trial.ERROR],
                       ["t0", "t1", "t2", "t3", "t4"], 95)
    assert line == ("[asha4] 1 running, 1 pending, 1 finished, 1 stopped early, 1 failed; "
                    "best val_acc=0.9500 (t1); 1m35s")


class FakeTrial:
    def __init__(self, trial_id, config, error=None):
        self.trial_id, self.config, self.last_result, self.error = trial_id, config, {}, error

    def get_pickled_error(self):
        return self.error


def test_trial_events_say_started_rung_stopped_finished_and_failed(capsys):
    """What Tune calls (Ray 2.60's TuneController): a result the scheduler stops the trial on
    comes marked `done`; a trial that returns sends no such result before it completes."""
    from methodlab.sweep_console import TrialEvents

    events = TrialEvents("sw", "val_acc", "max", rungs=[1, 4])
    good, bad, broken = FakeTrial("t_00000", {"train.lr": 0.01}), FakeTrial("t_00001", {"train.lr": 1e-7}), \
        FakeTrial("t_00002", {}, RuntimeError("Training failed due to worker errors:\n  FloatingPointError: "
                                              "non-finite loss loss=nan in steps 3-4"))
    for t in (good, bad, broken):
        events.on_trial_start(0, [], t)
    # (ASHA counts the final stage's epochs: `final_stage_epoch`; a one-stage run's are its epochs)
    for t, result in ((good, {"epoch": 1, "final_stage_epoch": 1, "stage": "train", "val_acc": 0.9}),
                      (bad, {"epoch": 1, "final_stage_epoch": 1, "stage": "train", "val_acc": 0.1, "done": True}),
                      (good, {"epoch": 2, "final_stage_epoch": 2, "stage": "train", "val_acc": 0.95})):
        t.last_result = result
        events.on_trial_result(0, [], t, result)
    events.on_trial_complete(0, [], bad)
    events.on_trial_complete(0, [], good)
    events.on_trial_error(0, [], broken)
    assert capsys.readouterr().out.splitlines() == [
        "[sw] trial t_00000 started: train.lr=0.01", "[sw] trial t_00001 started: train.lr=1e-07",
        "[sw] trial t_00002 started",
        "[sw] trial t_00000 reached rung epoch 1: val_acc=0.9000",
        "[sw] trial t_00001 stopped early at epoch 1: val_acc=0.1000",
        "[sw] trial t_00000 finished after 2 epochs: val_acc=0.9500",
        "[sw] trial t_00002 failed: FloatingPointError: non-finite loss loss=nan in steps 3-4"]
    assert events.best == (0.95, "t_00000") and events.stopped == {"t_00001"}


def test_a_rung_of_a_multi_stage_trial_is_said_in_final_stage_epochs(capsys):
    """A teacher epoch whose number is a rung is not one (ASHA counts the student's epochs)."""
    from methodlab.sweep_console import TrialEvents

    events = TrialEvents("mm", "val_mean_acc", "max", rungs=[2])
    t = FakeTrial("t_00000", {})
    for result in ({"epoch": 1, "stage": "teacher"}, {"epoch": 2, "stage": "teacher"},
                   {"epoch": 3, "final_stage_epoch": 1, "stage": "student", "val_mean_acc": 0.5},
                   {"epoch": 4, "final_stage_epoch": 2, "stage": "student", "val_mean_acc": 0.6}):
        events.on_trial_result(0, [], t, result)
    assert capsys.readouterr().out.splitlines() == [
        "[mm] trial t_00000 reached rung epoch 2 of student (epoch 4): val_mean_acc=0.6000"]


@pytest.mark.parametrize("argv", [["train", "supervised", "--verbose", "train.epochs=2"], ["sweep", "supervised", "--verbose"],
                                  ["demo", "--verbose"], ["submit", "--verbose", "train", "supervised"]])
def test_verbose_is_an_option_of_every_command_that_runs_ray(argv):
    from methodlab.cli import build_parser

    assert build_parser().parse_known_args(argv)[0].verbose


def test_submit_verbose_sends_the_setting_with_the_job():
    import json

    from methodlab.cli import _verbose_job_env

    assert json.loads(_verbose_job_env(None)) == {"env_vars": {console.VERBOSE_ENV: "1"}}
    assert json.loads(_verbose_job_env('{"env_vars": {"A": "1"}, "pip": ["x"]}')) == \
        {"env_vars": {"A": "1", console.VERBOSE_ENV: "1"}, "pip": ["x"]}
    for refused_by_submit in ("not json", "[1, 2]"):
        assert _verbose_job_env(refused_by_submit) == refused_by_submit
