"""The metric spool's file: every epoch's metrics, one JSON line each, appended before anything
is sent to MLflow, so a process killed with writes in flight loses none of them (the next
flush, a resumed run's or `methodlab sync`'s, sends what is left; `tracking.MetricSpool`).

No MLflow here: the training loop appends on its hot path without importing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class SpoolFile:
    def __init__(self, uri: str, run_id: str, spool_dir: str | os.PathLike):
        self.uri, self.run_id = uri, run_id
        self.path = Path(spool_dir) / f"{run_id}.jsonl"

    def append(self, metrics: dict[str, float], step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"uri": self.uri, "run_id": self.run_id, "step": step, "metrics": metrics}) + "\n")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
