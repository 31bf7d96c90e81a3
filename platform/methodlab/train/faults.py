"""Fault injection for the resilience tests; never a user setting (it is not in the config, so
it never reaches MLflow). The driver forwards `$METHODLAB_FAULTS` to the workers:

    METHODLAB_FAULTS="crash_after_epoch=2" pytest ...      # the last rank dies hard once, mid-epoch 3
    METHODLAB_FAULTS="crash_at_step=13"                    # ... once, just before optimizer step 13
    METHODLAB_FAULTS="nan_after_epoch=2"                   # every loss is NaN from epoch 3 on
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

ENV = "METHODLAB_FAULTS"


@dataclass
class Faults:
    crash_after_epoch: int | None = None
    crash_at_step: int | None = None
    nan_after_epoch: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Faults":
        known = {f.name for f in fields(cls)}
        values = {}
        for item in filter(None, (text or "").split(",")):
            key, _, value = item.partition("=")
            if key.strip() not in known:
                raise ValueError(f"{ENV}: unknown fault {key!r} (known: {', '.join(sorted(known))})")
            values[key.strip()] = int(value)
        return cls(**values)

    def crash_due(self, history_step: int, step: int, started_at: tuple[int, int]) -> bool:
        """True at the step where this attempt should die: the fault's point was not yet reached
        when the attempt started (`started_at` = its (history_step, step))."""
        if self.crash_after_epoch is not None:
            return history_step == self.crash_after_epoch and started_at[0] < self.crash_after_epoch
        if self.crash_at_step is not None:
            return step == self.crash_at_step and started_at[1] < self.crash_at_step
        return False

    def crash_once(self, run_id: str) -> None:
        """Die hard, once per run (a marker file remembers it across the restarted workers)."""
        marker = Path(tempfile.gettempdir()) / f"methodlab-crash-{run_id}"
        if marker.exists():
            return
        marker.touch()
        time.sleep(1.0)     # let the controller register the last checkpoint first
        os._exit(1)

    def corrupt(self, history_step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.nan_after_epoch is not None and history_step >= self.nan_after_epoch:
            return {k: v * float("nan") for k, v in losses.items()}
        return losses
