"""Benchmark results as MLflow runs, so every figure of `methodlab report` comes from a run.

`make bench` logs each benchmark as it finishes (`bench/common.py` calls `log_benchmark`). The
results committed under bench/results/ were measured on other machines; `record_committed` logs
each of them once as a run of experiment `methodlab-bench`, tagged with the file it was recorded
from and the git commit that last changed that file, so the report can say so under each figure.
A file is recorded again only when its bytes change (the run carries their sha256).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from methodlab.provenance import CHECKOUT, _git
from methodlab.tracking import BENCHMARK_TAG, Tracker

BENCH_EXPERIMENT = "methodlab-bench"
RESULTS_SHA_TAG = "methodlab.results_sha256"     # of the results JSON's bytes, on every bench run
RECORDED_FROM_TAG = "methodlab.recorded_from"    # the committed file a run was recorded from
RECORDED_COMMIT_TAG = "methodlab.recorded_commit"  # the commit that last changed that file


def results_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def log_benchmark(tracker: Tracker, name: str, payload: dict, text: str, tags: dict[str, str] | None = None) -> str:
    """One FINISHED run of benchmark `name`: figures as metrics, `payload` as results.json;
    `text` is the JSON as written to bench/results (its sha256 is tagged). Returns the run id."""
    run_id = tracker.start_run(f"bench-{name}", {"benchmark": name, "device": str(payload.get("device"))},
                               {BENCHMARK_TAG: name, RESULTS_SHA_TAG: results_sha(text), **(tags or {})}, text)
    metrics = {f["name"]: f["ratio"] for f in payload.get("figures", []) if isinstance(f.get("ratio"), (int, float))}
    if metrics:
        tracker.log_metrics(run_id, metrics, 0)
    tracker.log_object(run_id, payload, "results.json")
    tracker.end_run(run_id, "FINISHED")
    return run_id


def file_commit(path: Path) -> str:
    """The commit that last changed `path`, "+modified" when the file differs from it, "untracked"
    for a file git does not know, "unknown" without git."""
    rel = str(path.resolve().relative_to(CHECKOUT)) if path.resolve().is_relative_to(CHECKOUT) else str(path)
    commit = _git("log", "-1", "--format=%H", "--", rel)
    if commit is None:
        return "unknown"
    if not commit:
        return "untracked"
    return commit if _git("diff", "--quiet", "HEAD", "--", rel) is not None else f"{commit}+modified"


def record_committed(results_dir: Path, tracking_uri: str) -> list[tuple[str, str]]:
    """Logs each results_dir/<name>.json not yet in the store (by its sha256) as a run; returns
    (name, run id) of the runs it created."""
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return []
    tracker = Tracker(tracking_uri, BENCH_EXPERIMENT)
    known = {r.data.tags.get(RESULTS_SHA_TAG) for r in tracker.client.search_runs([tracker.experiment_id],
                                                                                  max_results=5000)}
    created = []
    for path in files:
        text = path.read_text()
        if results_sha(text) in known:
            continue
        shown = str(path.relative_to(CHECKOUT)) if path.resolve().is_relative_to(CHECKOUT) else str(path)
        created.append((path.stem, log_benchmark(tracker, path.stem, json.loads(text), text, {
            RECORDED_FROM_TAG: shown, RECORDED_COMMIT_TAG: file_commit(path)})))
    return created
