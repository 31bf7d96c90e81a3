"""`methodlab report`: one self-contained HTML page (PNG charts inlined) of every method against
its baselines, from the runs in MLflow: the latest run per method in experiment `methodlab` (the
demo) and the latest run per benchmark in `methodlab-bench` (`make bench`). A benchmark with no
MLflow run yet is shown from its committed bench/results/<name>.json, labelled as such.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from methodlab.config import methodlab_home

TEMPLATE = "report.html.j2"
REPO = Path(__file__).resolve().parents[3]


def bench_tracking_uri() -> str:
    """Benchmarks always record into the repo's default store, whatever home their runs use."""
    return os.environ.get("METHODLAB_BENCH_TRACKING_URI", f"sqlite:///{REPO / '.methodlab' / 'mlflow.db'}")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ratio_chart(figures: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f for f in figures if isinstance(f.get("ratio"), (int, float))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    ax.barh([r["name"] for r in rows], [r["ratio"] for r in rows], color="#4C72B0")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("ratio vs baseline (same process)")
    ax.invert_yaxis()
    return _png(fig)


def _quality_chart(rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("mean") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    labels = [f"{r['variant']} · {r['metric']}" for r in rows]
    ax.barh(labels, [r["mean"] for r in rows], xerr=[r.get("std") or 0 for r in rows], color="#55A868", capsize=3)
    ax.set_xlabel("mean ± std over seeds")
    ax.invert_yaxis()
    return _png(fig)


def _latest_runs(tracker, key_tag: str) -> dict[str, Any]:
    if tracker.experiment_id is None:
        return {}
    latest: dict[str, Any] = {}
    for run in tracker.client.search_runs([tracker.experiment_id], order_by=["attributes.start_time DESC"],
                                          max_results=500):
        key = run.data.tags.get(key_tag)
        if key and key not in latest and run.info.status == "FINISHED":
            latest[key] = run
    return latest


def _run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def collect(tracking_uri: str) -> dict[str, Any]:
    import methodlab.methods  # noqa: F401  (fills the method registry)
    from methodlab.registry import get_method, method_names
    from methodlab.tracking import BENCHMARK_TAG, METHOD_TAG, REGISTERED_VERSION_TAG, Tracker

    methods = []
    tracker = Tracker(tracking_uri, "methodlab")
    runs = _latest_runs(tracker, METHOD_TAG)
    for name in method_names():
        m = get_method(name)
        run = runs.get(name)
        methods.append({
            "name": name, "stages": " → ".join(m.stages), "metric": m.test_metric,
            "value": run.data.metrics.get(m.test_metric) if run else None,
            "run_name": run.info.run_name if run else None,
            "version": run.data.tags.get(REGISTERED_VERSION_TAG) if run else None,
            "link": _run_link(tracking_uri, tracker.experiment_id, run.info.run_id) if run else None,
        })

    bench_tracker = Tracker(bench_tracking_uri(), "methodlab-bench")
    bench_runs = _latest_runs(bench_tracker, BENCHMARK_TAG)
    benches = []
    # the quality table (claims gated on preconditions) is what a reader came for: it goes first
    names = sorted(set(bench_runs) | {p.stem for p in (REPO / "bench" / "results").glob("*.json")},
                   key=lambda n: (n != "quality", n))
    for name in names:
        if name in bench_runs:
            run = bench_runs[name]
            local = bench_tracker.client.download_artifacts(run.info.run_id, "results.json", _scratch())
            payload = json.loads(Path(local).read_text())
            source = f"MLflow run {run.info.run_id} ({bench_tracking_uri()})"
        else:
            payload = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
            source = f"bench/results/{name}.json (committed; run `make bench` to record it in MLflow)"
        quality = payload.get("quality", [])
        benches.append({"name": name, "source": source, "device": payload.get("device"),
                        "time": payload.get("time"), "figures": payload.get("figures", []),
                        "quality": quality, "claims": payload.get("claims", []), "counts": payload.get("counts"),
                        "ratio_chart": _ratio_chart(payload.get("figures", [])),
                        "quality_chart": _quality_chart(quality)})
    return {"methods": methods, "benches": benches, "tracking_uri": tracking_uri,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S")}


def _scratch() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="methodlab-report-")


def write_report(tracking_uri: str, out: str | None = None) -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("methodlab", "report"), autoescape=select_autoescape())
    env.filters["num"] = lambda v: "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
    html = env.get_template(TEMPLATE).render(**collect(tracking_uri))
    path = Path(out) if out else methodlab_home() / "report" / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path
