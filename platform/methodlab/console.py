"""What a run prints: methodlab's own lines, and the libraries' lines kept off the console unless
`--verbose` (METHODLAB_VERBOSE=1) asks for them.

Off by default, each where it is made:
- Ray's and MLflow's INFO/WARNING logger lines (`library_log_level`: Ray's driver, Ray Train,
  Ray Tune and MLflow loggers), matplotlib's ("generated new fontManager", `quiet_worker_logs`);
- MLflow's registration lines, printed with `print` rather than logged (`tracking`'s capture);
- `KNOWN_HARMLESS`: lines Ray writes (at error or warning level, or from actors outside the
  run's logging config) on every run or sweep that ask nothing of the user (Ray's
  PreemptionWatcher line, its placement-group cleaner's), dropped by the driver's Ray log forwarding
  (`configure_ray_logs`), never at their source: every other line of those processes still shows.

Ray folds a line that several workers print within 5 s into "[repeated Nx across cluster]",
printed later (after the run's summary, at shutdown); methodlab's own lines (`OWN_LINE`: the
run's epoch and progress lines, a sweep's trial lines) are never folded.
"""

from __future__ import annotations

import os
import re
import sys

VERBOSE_ENV = "METHODLAB_VERBOSE"
LOG_LEVEL_ENV = "METHODLAB_LOG_LEVEL"

# "[<run or sweep name>] ..." (names are check_name-safe: letters, digits, . _ -)
OWN_LINE = r"^\[[A-Za-z0-9][\w.-]*\] "
KNOWN_HARMLESS = [
    # [ray] TrainController, every run (Ray 2.60 core_worker.cc, at error level): Ray Train's own
    # actor, restartable, created with arguments in the object store; nothing a user can act on.
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* has constructor "
    r"arguments in the object store and max_restarts > 0",
    # [ray] Ray Train's PlacementGroupCleaner (a detached actor, outside the run's logging config)
    # after every trial a scheduler stopped: the cleanup that the sweep relies on, done.
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
    # [ray] raylet, in sweeps: a Tune trial, its Train controller and its workers are processes
    # each, so a few concurrent trials start more than twice the CPU count on a small node.
    r"WARNING: \d+ PYTHON worker processes have been started on node: .* which is \d+x the maximum "
    r"expected startup concurrency",
]
# [ray] the dedup token Ray's own tests rely on (ray_constants.TESTING_NEVER_DEDUP_TOKEN).
_RAY_NEVER_DEDUP = "__ray_testing_never_deduplicate__"


def verbose() -> bool:
    """METHODLAB_VERBOSE set to anything but "", 0, false or no (`--verbose` sets it)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    """`--verbose`: for this process and every process it starts (local Ray's workers inherit it)."""
    os.environ[VERBOSE_ENV] = "1"


def library_log_level() -> str:
    """The level of Ray's, MLflow's and matplotlib's own log lines: INFO with --verbose, else
    METHODLAB_LOG_LEVEL, else WARNING."""
    return "INFO" if verbose() else os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()


def forwarded_env() -> dict[str, str]:
    """The console settings of this process, for the processes of a cluster (a runtime env's
    env_vars): they do not inherit the driver's environment as a local Ray's do."""
    return {k: os.environ[k] for k in (VERBOSE_ENV, LOG_LEVEL_ENV) if os.environ.get(k)}


# The user's own patterns, as the process started (later calls must not take ours for theirs).
_THEIRS = {k: os.environ.get(k) for k in ("RAY_DEDUP_LOGS_ALLOW_REGEX", "RAY_DEDUP_LOGS_SKIP_REGEX")}


def _regex(env: str, own: list[str]) -> str:
    """`own` patterns, or'ed with whatever the user set in `env` (theirs kept)."""
    theirs = _THEIRS.get(env)
    return "|".join(f"(?:{p})" for p in ([theirs] if theirs else []) + own)


def configure_ray_logs() -> None:
    """Ray's log forwarding in this (the driver's) process: methodlab's lines never folded into
    "[repeated Nx across cluster]", the KNOWN_HARMLESS lines dropped (kept with --verbose).

    Ray reads RAY_DEDUP_LOGS_ALLOW_REGEX / _SKIP_REGEX once, when it is imported, into the
    deduplicators of its driver; so both are set in the environment before that (a CLI process)
    and, for a process that imported Ray already (a notebook, the tests), on the deduplicators."""
    allow = _regex("RAY_DEDUP_LOGS_ALLOW_REGEX", [_RAY_NEVER_DEDUP, OWN_LINE])
    # --verbose: only the user's own skip pattern, if any (an earlier quiet call's must not stay)
    skip = _regex("RAY_DEDUP_LOGS_SKIP_REGEX", [] if verbose() else KNOWN_HARMLESS) or None
    if "ray" not in sys.modules:
        os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"] = allow
        if skip:
            os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = skip
        return
    from ray._private import ray_logging  # [ray] the driver's deduplicators

    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        dedup.allow_re = re.compile(allow)
        dedup.skip_re = re.compile(skip) if skip else None


def quiet_worker_logs() -> None:
    """In a Ray worker, whose root logger Ray sets to INFO: matplotlib's INFO lines ("generated new
    fontManager", once per fresh home and worker) at `library_log_level`."""
    import logging

    logging.getLogger("matplotlib").setLevel(library_log_level())


def short(v) -> str:
    """A parameter's value in a line: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# Progress within an epoch (rank 0)


class ProgressClock:
    """When a progress update is due: `every_s` seconds of wall clock since the last one (or since
    `start`). Reads a clock only, never a device value: the loop's one host sync per log interval
    stays the only one."""

    def __init__(self, every_s: float, clock):
        self.every_s, self.clock = every_s, clock
        self.last = clock()

    def start(self) -> None:
        self.last = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        return True


def progress_line(run: str, stage: str, epoch: int, done: int, total: int, rate: float,
                  losses: dict[str, float]) -> str:
    """"[run] train epoch 3: 450/1000 steps (45%), 12.3 steps/s, ~45s left, loss=1.23": `done` of
    `total` batches at `rate` batches/s, `losses` as of the loop's last read of them (if any)."""
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    left = f", ~{(total - done) / rate:.0f}s left" if rate > 0 and total >= done else ""
    shown = "".join(f", {k}={v:.4g}" for k, v in losses.items())
    return f"[{run}] {stage} epoch {epoch}: {done}/{total} steps{pct}, {rate:.1f} steps/s{left}{shown}"
