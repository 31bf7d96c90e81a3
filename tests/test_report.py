"""`methodlab report` renders runs and benchmark results from MLflow into one self-contained page."""

from __future__ import annotations

import re

from methodlab.report import write_report
from methodlab.tracking import METHOD_TAG, Tracker


def test_report_is_self_contained_and_shows_runs_and_benchmarks(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("METHODLAB_BENCH_TRACKING_URI", uri)
    runs = Tracker(uri, "methodlab")
    run_id = runs.start_run("supervised-abc", {}, {METHOD_TAG: "supervised", "methodlab.registered_version": "3"}, "x: 1\n")
    runs.log_metrics(run_id, {"test_acc": 0.9876}, 0)
    runs.end_run(run_id, "FINISHED")
    bench = Tracker(uri, "methodlab-bench")
    bench_id = bench.start_run("bench-demo", {}, {"methodlab.benchmark": "zz-demo"}, "{}")
    bench.log_object(bench_id, {"benchmark": "zz-demo", "device": "CPU", "time": "now",
                                "figures": [{"name": "speedup", "ratio": 123.5, "baseline": "scipy", "detail": {}, "goal": ">= 100"}],
                                "quality": [{"variant": "method", "metric": "acc", "mean": 0.8, "std": 0.01, "n": 3},
                                            {"variant": "baseline", "metric": "acc", "mean": 0.7, "std": 0.02, "n": 3}],
                                "claims": [{"claim": "method beats baseline", "held": True, "evidence": "0.80 vs 0.70"}]},
                    "results.json")
    bench.end_run(bench_id, "FINISHED")

    html = write_report(uri, str(tmp_path / "r.html")).read_text()
    assert "supervised-abc" in html and "0.9876" in html
    assert "zz-demo" in html and "123.5" in html and "method beats baseline" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 2     # charts are inlined
    assert not re.search(r'src="(?!data:)', html)                         # nothing external
