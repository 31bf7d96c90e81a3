"""Shared by every benchmark: figures are ratios against a baseline measured in the same process.

    figures = [Figure("overhead_1worker", ratio=1.03, baseline="plain torch loop", detail={...})]
    write_results("overhead", figures)

Each script writes bench/results/<name>.json and prints one line per figure.
"""

from __future__ import annotations

import json
import platform as _stdlib_platform  # the stdlib module (methodlab's source root is not a package)
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    name: str
    ratio: float | None            # measured / baseline (or the figure itself when it is a score)
    baseline: str
    detail: dict[str, Any] = field(default_factory=dict)
    goal: str = ""

    def line(self) -> str:
        ratio = f"{self.ratio:.3f}x" if self.ratio is not None else "n/a"
        goal = f"  (goal {self.goal})" if self.goal else ""
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.detail.items())
        return f"{self.name:40s} {ratio:>9s} vs {self.baseline}{goal}  {extra}"


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({_stdlib_platform.processor() or _stdlib_platform.machine()}, {__import__('os').cpu_count()} cores)"


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_stage(method, stage: str, previous: dict, device=None) -> dict:
    """One stage of `method` on one in-process worker, through the training core
    (`methodlab.train.core.Loop`, no Ray, checkpoints or MLflow): the benchmarks' training loop.
    Returns the stage's models; `previous` holds the models of the stage before."""
    import torch

    from methodlab.train.core import Loop, LoopState

    index = method.stages.index(stage)
    loop = Loop(method.cfg, method, device or torch.device("cpu"))
    return loop.run_stage(LoopState(stage_index=index), index, previous)


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "n/a"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_results(name: str, figures: list[Figure], extra: dict[str, Any] | None = None) -> Path:
    """bench/results/<name>.json, one printed line per figure, and a run in the MLflow experiment
    `methodlab-bench` (figures as metrics, the JSON as an artifact) that `methodlab report` reads."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "device": device_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "figures": [asdict(f) for f in figures], **(extra or {})}
    text = json.dumps(payload, indent=1)
    out.write_text(text)
    for f in figures:
        print(f.line(), flush=True)
    print(f"wrote {out}")
    _log_to_mlflow(name, payload, text)
    return out


def _log_to_mlflow(name: str, payload: dict, text: str) -> None:
    """The run `methodlab report` draws this benchmark's figures from (the same bytes as the file,
    by sha256, so `methodlab report` does not record the file again)."""
    from methodlab.report import bench_tracking_uri
    from methodlab.report.record import BENCH_EXPERIMENT, log_benchmark
    from methodlab.tracking import Tracker

    tracker = Tracker(bench_tracking_uri(), BENCH_EXPERIMENT)
    run_id = log_benchmark(tracker, name, payload, text)
    print(f"logged to MLflow {tracker.uri} (experiment {BENCH_EXPERIMENT}, run {run_id})")


TUNED = RESULTS / "tuned.json"


def tuned(bench: str) -> dict[str, dict]:
    """bench/tune.py's choices for `bench`: {variant key: {"sweep", "params", ...}} ({} if none)."""
    return json.loads(TUNED.read_text()).get(bench, {}) if TUNED.exists() else {}


def variant_key(variant: str, dataset: str) -> str:
    """A variant's key in tuned.json, with its task, so that a benchmark reads the choices made on
    its own task ("dropout+MAD" on shapes_multimodal: "dropout-plus-MAD-shapes_multimodal")."""
    return f"{variant.replace('+', '-plus-')}-{dataset}"


def tuned_overrides(entry: dict | None) -> list[str]:
    """The `key=value` overrides a tuned variant trains with (none for an untuned one)."""
    return [f"{k}={v}" for k, v in (entry or {}).get("params", {}).items()]


def tuned_by(entry: dict | None) -> str:
    """How a variant's hyperparameters were chosen, as the quality table shows it."""
    if entry is None:
        return "not swept: the benchmark's settings"
    if not entry.get("sweep"):
        return entry.get("note", "nothing to tune")
    chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["params"].items())
    return f"sweep {entry['sweep']} ({chosen})"
