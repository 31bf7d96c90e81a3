"""The metric spool's file: every epoch's metrics, one JSON line each, appended before anything
is sent to MLflow, so a process killed with writes in flight loses none of them (the next
flush, a resumed run's or `methodlab sync`'s, sends what is left; `tracking.MetricSpool`).

The training thread appends while the MLflow thread sends: a flush takes the lines there are
(`pending`) and, once they are sent, drops exactly those (`drop`), so a line appended during
the send stays for the next flush. Both hold one lock only for the file operation, never for
the network call.

No MLflow here: the training loop appends on its hot path without importing it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from methodlab.errors import DataError

SPOOL_KEYS = {"uri", "run_id", "step", "metrics"}     # what every line has (SpoolFile.append adds "epoch")
_FILE_LOCK = threading.Lock()    # one per process: the appender and the sender are threads of one


class SpoolFile:
    def __init__(self, uri: str, run_id: str, spool_dir: str | os.PathLike):
        self.uri, self.run_id = uri, run_id
        self.path = Path(spool_dir) / f"{run_id}.jsonl"

    def append(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """One epoch's metrics: `epoch` counts the run's epochs over all stages (1 = the first),
        `step` is the global optimizer step at its end, its MLflow step (`tracking.flush_spool_file`)."""
        line = json.dumps({"uri": self.uri, "run_id": self.run_id, "step": step, "epoch": epoch,
                           "metrics": metrics}) + "\n"
        with _FILE_LOCK:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(line)


def pending(path: Path) -> list[dict]:
    """The lines spooled so far (none when the file is gone)."""
    with _FILE_LOCK:
        return _read(path)


def drop(path: Path, sent: int) -> None:
    """Remove the first `sent` lines; the file goes when nothing else was appended meanwhile."""
    with _FILE_LOCK:
        rest = _read(path)[sent:]
        if not rest:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in rest))
        os.replace(tmp, path)       # atomic: a crash here leaves the old file (its steps are deduplicated)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not SPOOL_KEYS <= entry.keys():
            raise DataError(f"metric spool {path} line {n} is not a spooled metrics line; move the file "
                            "aside (or delete that line) and run `methodlab sync` again")
        lines.append(entry)
    return lines
