"""A sweep's console: one line per trial event, and a compact status line at most every
`STATUS_EVERY_S`, in place of Tune's status tables (`tune.CLIReporter`, one every few seconds).

    [asha4] trial 6e1f2_00000 started: train.lr=0.01
    [asha4] trial 6e1f2_00000 reached rung epoch 1: val_acc=0.9012
    [mm] trial 3a1b2_00000 reached rung epoch 2 of student (epoch 17): val_mean_acc=0.6120
    [asha4] trial 6e1f2_00001 stopped early at epoch 1: val_acc=0.1003
    [asha4] trial 6e1f2_00000 finished after 3 epochs: val_acc=0.9500
    [asha4] trial 6e1f2_00002 failed: TrainingError: trial ... failed: FloatingPointError: ...
    [asha4] 2 running, 1 pending, 1 finished, 1 stopped early, 0 failed; best val_acc=0.9500 (6e1f2_00000); 1m30s

The trials' own epoch lines come from their workers, as for a run. Imported by `sweep._fit` only
(it imports Ray Tune, which must not be imported before `launch.ensure_ray`).
"""

from __future__ import annotations

import math
import time

from ray import tune  # [ray]
from ray.tune.experiment import Trial  # [ray]

from methodlab.console import short
from methodlab.train.core import FINAL_STAGE_EPOCH

STATUS_EVERY_S = 30.0


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The final-stage epochs at which ASHA compares trials (its single bracket's milestones, as
    Ray's AsyncHyperBandScheduler computes them: grace_period * reduction_factor**k below max_t)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [round(grace_period * reduction_factor ** k) for k in range(count)]


class TrialEvents(tune.Callback):
    """Prints a trial's start, each ASHA rung it reaches, and how it ended. Tune marks the result
    on which its scheduler stops a trial `done`; a trial that ends by returning sends no such
    result (Ray 2.60's TuneController: the function's end is a duplicate result, not passed to
    callbacks), so a `done` result means stopped early."""

    def __init__(self, sweep: str, metric: str, mode: str, rungs: list[int] = ()):
        self.sweep, self.metric, self.mode, self.rungs = sweep, metric, mode, set(rungs)
        self.stopped: set[str] = set()
        self.best: tuple[float, str] | None = None

    def _say(self, trial: Trial, what: str) -> None:
        print(f"[{self.sweep}] trial {trial.trial_id} {what}", flush=True)

    def _value(self, result: dict) -> str:
        value = result.get(self.metric)
        return f"{self.metric}={value:.4f}" if isinstance(value, (int, float)) else f"{self.metric}=n/a"

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        shown = ", ".join(f"{k}={short(v)}" for k, v in (trial.config or {}).items())
        self._say(trial, f"started: {shown}" if shown else "started")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (value, trial.trial_id)
        if result.get("done"):
            self.stopped.add(trial.trial_id)
        elif result.get(FINAL_STAGE_EPOCH) in self.rungs:
            # (ASHA counts the final stage's epochs; the workers' lines number the epochs of all stages)
            at = result[FINAL_STAGE_EPOCH]
            where = "" if at == result.get("epoch") else f" of {result.get('stage')} (epoch {result.get('epoch')})"
            self._say(trial, f"reached rung epoch {at}{where}: {self._value(result)}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        last = trial.last_result or {}
        if trial.trial_id in self.stopped:
            self._say(trial, f"stopped early at epoch {last.get('epoch', '?')}: {self._value(last)}")
        else:
            self._say(trial, f"finished after {last.get('epoch', '?')} epochs: {self._value(last)}")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        from methodlab.train.launch import worker_error_line

        error = trial.get_pickled_error()
        self._say(trial, f"failed: {worker_error_line(error) if error is not None else 'see the error above'}")


class StatusLine(tune.ProgressReporter):
    """One compact line of the sweep's state, at most every `every_s` seconds while it runs
    (none at the end: the summary follows)."""

    def __init__(self, events: TrialEvents, every_s: float = STATUS_EVERY_S):
        self.events, self.every_s = events, every_s
        self.start = self.last = time.time()

    def setup(self, start_time: float | None = None, **kwargs) -> None:
        self.start = self.last = start_time or time.time()

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        return not done and time.time() - self.last >= self.every_s

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        self.last = time.time()
        print(status_line(self.events, [t.status for t in trials], [t.trial_id for t in trials],
                          self.last - self.start), flush=True)


def status_line(events: TrialEvents, statuses: list[str], ids: list[str], seconds: float) -> str:
    """"[sweep] 2 running, 1 pending, 1 finished, 1 stopped early, 0 failed; best ...; 1m30s"."""
    stopped = sum(1 for s, i in zip(statuses, ids) if s == Trial.TERMINATED and i in events.stopped)
    counts = [(statuses.count(Trial.RUNNING), "running"), (statuses.count(Trial.PENDING), "pending"),
              (statuses.count(Trial.TERMINATED) - stopped, "finished"), (stopped, "stopped early"),
              (statuses.count(Trial.ERROR), "failed")]
    best = f"; best {events.metric}={events.best[0]:.4f} ({events.best[1]})" if events.best else ""
    minutes, secs = divmod(int(seconds), 60)
    return f"[{events.sweep}] {', '.join(f'{n} {what}' for n, what in counts)}{best}; {minutes}m{secs:02d}s"
