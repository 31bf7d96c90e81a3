"""`methodlab report`: one self-contained HTML page (PNG charts inlined), every figure drawn from an
MLflow run and captioned with it:

1. the claim table: each method against its baselines over seeds, the paper's claim, the verdict,
   mean ± spread and n (the `quality` benchmark, bench/quality.py);
2. one section per method: its `make demo` runs labelled by role (the method, its baseline, the
   runs it starts from, e.g. "backbone for toast (methodlab-vit-source)"), one chart per
   (task, metric) of the quality rows, and its benchmarks with one chart per figure family;
3. the infrastructure benchmarks (overhead, data path, sweeps, ...), on their own.

Benchmarks come from the latest run per benchmark in experiment `methodlab-bench`: `make bench`
logs them as it measures, and the results committed under bench/results/ are recorded there first
(`record.record_committed`, tagged with the file and its commit) unless `record=False`.
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
RESULTS = REPO / "bench" / "results"
# What `make demo` ran a run as (demo.py sets them; the report labels runs by them).
ROLE_TAG = "methodlab.role"                      # method | baseline | prerequisite
ROLE_LABEL_TAG = "methodlab.role_label"          # e.g. "baseline of toast: full fine-tuning"
PREREQUISITE_FOR_TAG = "methodlab.prerequisite_for"   # "toast:backbone,...": who loads its model
ROLES = ("method", "baseline", "prerequisite")


def bench_tracking_uri() -> str:
    """Benchmarks always record into the repo's default store, whatever home their runs use."""
    return os.environ.get("METHODLAB_BENCH_TRACKING_URI", f"sqlite:///{REPO / '.methodlab' / 'mlflow.db'}")


# -- charts --------------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _barh(labels: list[str], values: list[float], xlabel: str, title: str, errors: list[float] | None = None,
          colors: list[str] | None = None, reference: float | None = None, unit_interval: bool = False) -> str:
    """One horizontal bar chart; a log axis where the values span more than 20x (speed-ups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.32 * len(labels) + 1.1))
    ax.barh(labels, values, xerr=errors, color=colors or "#4C72B0", capsize=3)
    positive = [v for v in values if v > 0]
    if len(positive) == len(values) and max(values) / min(values) > 20:
        ax.set_xscale("log")
    elif unit_interval:
        ax.set_xlim(0, 1)
    if reference is not None:
        ax.axvline(reference, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10, loc="left")
    ax.invert_yaxis()
    return _png(fig)


def _common_tokens(names: list[str], reverse: bool = False) -> str:
    """The `_`-separated tokens all `names` start with (or, `reverse`, end with)."""
    parts = [n.split("_")[::-1] if reverse else n.split("_") for n in names]
    common = []
    for tokens in zip(*parts):
        if len(set(tokens)) > 1:
            break
        common.append(tokens[0])
    return "_".join(common[::-1] if reverse else common)


def figure_families(figures: list[dict]) -> list[dict]:
    """A benchmark's figures grouped by what they are measured against (their `baseline`): one
    family is one unit (a speed-up over scipy, a latency ratio over the plain predictor, a score),
    so one chart never mixes them. A family is named by its figures' common name prefix (or
    suffix, or else its baseline); its chart labels are the names without it. Order: first
    appearance."""
    groups: dict[str, list[dict]] = {}
    for f in figures:
        groups.setdefault(f.get("baseline", ""), []).append(f)
    families = []
    for baseline, members in groups.items():
        names = [f["name"] for f in members]
        prefix, suffix = _common_tokens(names), _common_tokens(names, reverse=True)
        if len(names) == 1:
            name, labels = names[0], names
        elif prefix:
            name, labels = prefix, [n[len(prefix) + 1:] or n for n in names]
        elif suffix:
            name, labels = suffix, [n[:-len(suffix) - 1] or n for n in names]
        else:
            name, labels = baseline, names
        for f, label in zip(members, labels):
            f["label"] = label
        families.append({"name": name, "baseline": baseline, "figures": members,
                         "score": baseline.startswith(("score", "precondition", "cosine"))})
    return families


def _family_chart(family: dict, title: str) -> str | None:
    rows = [f for f in family["figures"] if isinstance(f.get("ratio"), (int, float))]
    if len(rows) < 2:
        return None          # one number reads better in the table than as one bar
    xlabel = family["baseline"] if family["score"] else f"measured / {family['baseline']}"
    values = [f["ratio"] for f in rows]
    return _barh([f["label"] for f in rows], values, xlabel[:110], title, reference=None if family["score"] else 1.0,
                 unit_interval=family["score"] and all(0 <= v <= 1 for v in values))     # (accuracies: one axis)


def _quality_charts(rows: list[dict], better: set[str], title: str) -> list[dict]:
    """One chart per (task, metric) of a method's quality rows: every variant's mean ± std over
    seeds on one axis; the method's own variants (the better side of a claim) in green."""
    out = []
    for task, metric in dict.fromkeys((r["task"], r["metric"]) for r in rows):
        group = [r for r in rows if (r["task"], r["metric"]) == (task, metric)]
        values = [r["mean"] for r in group]
        out.append({"task": task, "metric": metric, "image": _barh(
            [f"{r['variant']} (n={r['n']})" for r in group], values, f"{metric}: mean ± std over seeds",
            f"{title}: {task}", errors=[r.get("std") or 0 for r in group],
            colors=["#55A868" if r["variant"] in better else "#8C8C8C" for r in group],
            unit_interval=all(0 <= v <= 1 for v in values))})
    return out


# -- runs ----------------------------------------------------------------------------------------

def _finished_runs(tracker) -> list:
    if tracker.experiment_id is None:
        return []
    return [r for r in tracker.client.search_runs([tracker.experiment_id], order_by=["attributes.start_time DESC"],
                                                  max_results=5000) if r.info.status == "FINISHED"]


# MLflow 3.17's UI decides between its GenAI pages (Overview, traces) and the training runs by the
# `workflowType` URL parameter, else the browser's stored choice (default genai), not by the
# experiment's mlflow.experimentKind tag: a link without it opens a fresh browser on the GenAI
# Overview, seen in headless chromium (tests/test_ui.py opens the report's link).
UI_QUERY = "?workflowType=machine_learning"


def _run_link(base: str | None, experiment_id: str, run_id: str) -> str | None:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_QUERY}" if base else None


def experiment_link(base: str | None, experiment_id: str | None) -> str | None:
    """The experiment's runs table in the MLflow UI at `base`."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs{UI_QUERY}" if base and experiment_id else None


def ui_base(tracking_uri: str, ui_url: str | None, store: str) -> str | None:
    """The MLflow UI that shows `store`'s runs: the tracking server itself, or `ui_url` (e.g. a
    local `mlflow ui` on the SQLite file) when it serves the report's main store."""
    if store.startswith(("http://", "https://")):
        return store
    return ui_url if ui_url and store == tracking_uri else None


def method_label(method) -> str:
    """The role label of a method's own run; a method with no baseline of its own is one."""
    return f"{method.name} (the method)" if method.demo_baseline else f"{method.name} baseline"


def run_role(run, method) -> tuple[str, str, bool]:
    """(role, label, inferred) of one run of `method`: the demo's role tags, or for a run without
    them (an older store, a hand-started run) what its params say: not registered -> a baseline,
    registered under another name than the method's own -> a run others start from."""
    tags, params = run.data.tags, run.data.params
    if tags.get(ROLE_TAG) in ROLES:
        return tags[ROLE_TAG], tags.get(ROLE_LABEL_TAG, tags[ROLE_TAG]), False
    model = params.get("tracking.registered_model") or f"methodlab-{method.name}"
    if params.get("tracking.register_model") == "False":
        label = f"baseline of {method.name}: {method.demo_baseline[0]}" if method.demo_baseline else "not registered"
        return "baseline", label, True
    if model != f"methodlab-{method.name}":
        return "prerequisite", f"{method.name} run registering {model}", True
    return "method", method_label(method), True


def _run_row(run, method, role: str, label: str, inferred: bool, link_base: str | None, experiment_id: str) -> dict:
    from methodlab.tracking import DATASET_TAG, REGISTERED_VERSION_TAG

    version = run.data.tags.get(REGISTERED_VERSION_TAG)
    return {"role": role, "label": label, "inferred": inferred, "run_name": run.info.run_name,
            "run_id": run.info.run_id, "method": method.name, "metric": method.test_metric,
            "value": run.data.metrics.get(method.test_metric), "dataset": run.data.tags.get(DATASET_TAG, ""),
            "model": run.data.params.get("tracking.registered_model", ""),
            "version": None if version in (None, "none") else version,
            "link": _run_link(link_base, experiment_id, run.info.run_id)}


def demo_rows(runs: list, link_base: str | None, experiment_id: str) -> dict[str, list[dict]]:
    """Per method, its runs by role, the latest of each label: the method's run first, then its
    baseline, then the runs whose models it loads (another method's runs, by their tag)."""
    from methodlab.registry import get_method, method_names
    from methodlab.tracking import METHOD_TAG

    out: dict[str, list[dict]] = {name: [] for name in method_names()}
    seen: set[tuple[str, str]] = set()
    for run in runs:                                     # newest first
        name = run.data.tags.get(METHOD_TAG)
        if name not in out:
            continue
        method = get_method(name)
        role, label, inferred = run_role(run, method)
        if (name, label) not in seen:
            seen.add((name, label))
            out[name].append(_run_row(run, method, role, label, inferred, link_base, experiment_id))
        for use in filter(None, run.data.tags.get(PREREQUISITE_FOR_TAG, "").split(",")):
            consumer, _, field = use.partition(":")
            model = run.data.params.get("tracking.registered_model", "")
            label = f"{field} for {consumer} ({model})"
            if consumer in out and (consumer, label) not in seen:
                seen.add((consumer, label))
                out[consumer].append(_run_row(run, method, "prerequisite", label, False, link_base, experiment_id))
    for rows in out.values():
        rows.sort(key=lambda r: ROLES.index(r["role"]))
    return out


def _bench_source(run) -> str:
    from methodlab.report.record import RECORDED_COMMIT_TAG, RECORDED_FROM_TAG

    tags = run.data.tags
    if RECORDED_FROM_TAG in tags:
        return f"recorded from {tags[RECORDED_FROM_TAG]} at commit {tags.get(RECORDED_COMMIT_TAG, 'unknown')[:12]}"
    return f"measured by bench/{tags.get('methodlab.benchmark')}.py at commit {tags.get('git_commit', 'unknown')[:12]}"


def _bench(run, tracker, link_base: str | None) -> dict:
    local = tracker.client.download_artifacts(run.info.run_id, "results.json", _scratch())
    payload = json.loads(Path(local).read_text())
    return {"payload": payload, "run_id": run.info.run_id, "source": _bench_source(run),
            "link": _run_link(link_base, tracker.experiment_id, run.info.run_id),
            "device": payload.get("device"), "time": payload.get("time")}


def bench_method(bench: str, methods: list[str]) -> str | None:
    """The method a benchmark measures (`toast_shapes` -> toast), None for infrastructure."""
    hits = [m for m in methods if bench == m or bench.startswith(m + "_")]
    return max(hits, key=len) if hits else None


def _bench_section(name: str, b: dict) -> dict:
    families = figure_families(b["payload"].get("figures", []))
    for fam in families:
        fam["chart"] = _family_chart(fam, f"{name}: {fam['name']}")
    return {"name": name, **{k: b[k] for k in ("run_id", "source", "link", "device", "time")}, "families": families}


def collect(tracking_uri: str, ui_url: str | None = None, record: bool = True,
            results_dir: Path | None = None) -> dict[str, Any]:
    """What the template renders; `record` first records the committed results in `results_dir`
    (default bench/results)."""
    import methodlab.methods  # noqa: F401  (fills the method registry)
    from methodlab.registry import get_method, method_names
    from methodlab.report.record import BENCH_EXPERIMENT, record_committed
    from methodlab.tracking import BENCHMARK_TAG, Tracker

    bench_uri = bench_tracking_uri()
    recorded = record_committed(results_dir or RESULTS, bench_uri) if record else []
    tracker = Tracker(tracking_uri, "methodlab")
    runs_link = ui_base(tracking_uri, ui_url, tracking_uri)
    rows = demo_rows(_finished_runs(tracker), runs_link, tracker.experiment_id)

    bench_tracker = Tracker(bench_uri, BENCH_EXPERIMENT)
    bench_link = ui_base(tracking_uri, ui_url, bench_uri)
    benches: dict[str, dict] = {}
    for run in _finished_runs(bench_tracker):        # newest first: the latest run per benchmark
        key = run.data.tags.get(BENCHMARK_TAG)
        if key and key not in benches:
            benches[key] = _bench(run, bench_tracker, bench_link)

    quality = benches.pop("quality", None)
    claims = quality["payload"].get("claims", []) if quality else []
    quality_rows = quality["payload"].get("quality", []) if quality else []
    names = method_names()
    order = [*dict.fromkeys([c["method"] for c in claims if c.get("method") in names]), *names]
    sections = []
    for name in dict.fromkeys(order):
        mine = [r for r in quality_rows if r.get("method") == name]
        better = {c["better"]["variant"] for c in claims if c.get("method") == name and c.get("better")}
        sections.append({
            "name": name, "stages": " → ".join(get_method(name).stages), "runs": rows[name],
            "claims": [c for c in claims if c.get("method") == name],
            "quality_charts": _quality_charts(mine, better, name) if mine else [],
            "benches": [_bench_section(b, benches[b]) for b in sorted(benches) if bench_method(b, names) == name]})
    infra = [_bench_section(b, benches[b]) for b in sorted(benches) if bench_method(b, names) is None]
    return {"claims": claims, "counts": quality["payload"].get("counts") if quality else None,
            "quality": quality, "confidence": quality["payload"].get("confidence") if quality else None,
            "sections": sections, "infra": infra, "tracking_uri": tracking_uri, "bench_uri": bench_uri,
            "recorded": recorded, "ui_url": ui_url, "runs_link": experiment_link(runs_link, tracker.experiment_id),
            "bench_link": experiment_link(bench_link, bench_tracker.experiment_id), "generated": time.strftime("%Y-%m-%d %H:%M:%S")}


def _scratch() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="methodlab-report-")


def _num(v, spec: str = ".4g"):
    """A number as the tables show it; a list of them each so, and any other value cut at 160
    characters (a benchmark's detail can hold per-seed configs)."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(str(_num(x, spec)) for x in v) + "]"
    text = str(v)
    return text if len(text) <= 160 else text[:159] + "…"


def write_report(tracking_uri: str, out: str | None = None, ui_url: str | None = None, record: bool = True,
                 results_dir: Path | None = None) -> Path:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("methodlab", "report"), autoescape=select_autoescape())
    env.filters["num"] = _num
    html = env.get_template(TEMPLATE).render(**collect(tracking_uri, ui_url, record, results_dir))
    path = Path(out) if out else methodlab_home() / "report" / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path
