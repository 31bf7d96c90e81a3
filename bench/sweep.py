"""ASHA against FIFO: the same sweep (space, sampler seed, trials, per-trial resources) run once
with each scheduler, on the supervised method and the built-in digits data.

Reported, ASHA as a ratio of FIFO measured in this same process:
  - trial-epochs spent (the compute: every epoch of every trial, the stopped ones up to their stop);
  - the best validation accuracy reached;
  - the sweep's wall time (start-up of each trial's Ray Train run included).
Both sweeps sample the same configurations (checked), so the difference is the scheduler alone.

    .venv/bin/python bench/sweep.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_HOME = tempfile.mkdtemp(prefix="mlsw-")   # short: Ray's socket paths must stay under 107 bytes
os.environ.setdefault("METHODLAB_HOME", os.path.join(_HOME, "home"))
os.environ.setdefault("RAY_TMPDIR", os.path.join(_HOME, "r"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from common import Figure, write_results  # noqa: E402
from methodlab.sweep import run_sweep  # noqa: E402

TRIALS, EPOCHS, CONCURRENT = 8, 6, 2
OVERRIDES = [
    f"train.epochs={EPOCHS}", "data.limit_rows=600", "scaling.num_workers=1", "scaling.cpus_per_worker=0.49",
    f"search.num_samples={TRIALS}", f"search.max_concurrent_trials={CONCURRENT}", "search.seed=0",
    "space.train.lr={loguniform: [1.0e-5, 3.0e-2]}", "space.train.batch_size={choice: [32, 64]}",
    "space.train.weight_decay=null",
    "search.scheduler.grace_period=1", "search.scheduler.reduction_factor=3",
]


def one(scheduler: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    s = run_sweep("supervised", None, [*OVERRIDES, f"search.scheduler.type={scheduler}", f"name=bench-{scheduler}"])
    wall = time.perf_counter() - t0
    print(s.line(), f"({wall:.0f}s)", flush=True)
    configs = sorted(tuple(sorted(t.params.items())) for t in s.trials)
    return {"trial_epochs": s.trial_epochs, "best": s.best.metric, "stopped": sum(t.stopped_early for t in s.trials),
            "epochs_per_trial": [t.epochs for t in s.trials], "configs": configs,
            "best_config": s.best.params}, wall


def main() -> None:
    fifo, fifo_wall = one("fifo")
    asha, asha_wall = one("asha")
    assert fifo["configs"] == asha["configs"], "the two sweeps sampled different configurations"
    ratio = asha["trial_epochs"] / fifo["trial_epochs"]
    figures = [
        Figure("asha_trial_epochs", ratio, "FIFO, same space, seed and trials",
               {"asha": asha["trial_epochs"], "fifo": fifo["trial_epochs"], "compute_saved": 1 - ratio,
                "trials": TRIALS, "epochs_per_trial": EPOCHS, "asha_stopped": asha["stopped"]},
               goal="< 1 (ASHA spends less)"),
        Figure("asha_best_val_acc", asha["best"] / fifo["best"], "FIFO best val_acc",
               {"asha": asha["best"], "fifo": fifo["best"]}, goal="~1 (same best found)"),
        Figure("asha_wall_time", asha_wall / fifo_wall, "FIFO sweep wall time",
               {"asha_s": asha_wall, "fifo_s": fifo_wall, "concurrent_trials": CONCURRENT}),
    ]
    write_results("sweep", figures, {
        "setup": {"method": "supervised", "dataset": "digits (600 train rows)", "overrides": OVERRIDES,
                  "trial": "1 Ray Train worker x 0.49 CPU, 0.01 CPU Tune function"},
        "fifo": {k: v for k, v in fifo.items() if k != "configs"},
        "asha": {k: v for k, v in asha.items() if k != "configs"},
        "configs": [dict(c) for c in fifo["configs"]],
    })


if __name__ == "__main__":
    main()
