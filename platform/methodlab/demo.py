"""`make demo`: every registered method trained on its built-in dataset, on a local Ray with 2
workers, tracked in a local MLflow (SQLite), each model registered. Runs are named after their
config, so a second `make demo` finds them finished and only prints the results."""

from __future__ import annotations

import time

import methodlab.methods  # noqa: F401  (fills the registries)
from methodlab.config import load_config, methodlab_home
from methodlab.registry import get_method, method_names


def demo_plan() -> list[tuple[str, list[str]]]:
    """Every method's demo run, each after the runs it starts from (`demo_prerequisites`, e.g. the
    baseline whose registered backbone TOAST and canonicalization load)."""
    plan: list[tuple[str, list[str]]] = []
    for name in method_names():
        method = get_method(name)
        for step in [*method.demo_prerequisites, (name, list(method.demo_overrides))]:
            if step not in plan:
                plan.append(step)
    return plan


def baseline_plan(name: str) -> tuple[str, list[str]] | None:
    """(label, overrides) of the baseline run shown next to method `name`: its demo overrides plus
    the baseline's, not registered (the method's `candidate` alias stays the method's)."""
    method = get_method(name)
    if method.demo_baseline is None:
        return None
    label, extra = method.demo_baseline
    return label, [*method.demo_overrides, *extra, "tracking.register_model=false"]


def run_demo(extra_overrides: list[str] = ()) -> int:
    from methodlab.train.launch import train

    def run(name: str, overrides: list[str], what: str):
        cfg = load_config(name, None, [*overrides, *extra_overrides])
        print(f"\n=== {what} ({cfg.run_name}) ===", flush=True)
        t0 = time.time()
        summary = train(cfg)
        print(summary.line(get_method(name).test_metric), flush=True)
        return cfg, summary, time.time() - t0

    rows = []
    t_start = time.time()
    for name, overrides in demo_plan():
        cfg, summary, seconds = run(name, overrides, name)
        method = get_method(name)
        baseline = None
        if (plan := baseline_plan(name)) is not None and list(overrides) == list(method.demo_overrides):
            label, base_overrides = plan
            _, base_summary, _ = run(name, base_overrides, f"{name}: baseline {label}")
            baseline = (label, base_summary.metrics.get(method.test_metric))
        rows.append((name, cfg.tracking.registered_model, method.test_metric,
                     summary.metrics.get(method.test_metric), summary.version, baseline, seconds))

    def shown(value) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    baselines = sum(1 for row in rows if row[5])
    print(f"\nmethodlab demo: {len(rows) + baselines} runs ({baselines} of them baselines) in "
          f"{time.time() - t_start:.0f}s")
    print(f"{'method':18s} {'metric':16s} {'value':>8s}  {'baseline on the same task':36s} registered model")
    for name, model, metric, value, version, baseline, _ in rows:
        base = f"{shown(baseline[1]):>8s}  {baseline[0]}" if baseline else ""
        print(f"{name:18s} {metric:16s} {shown(value):>8s}  {base:36s} {model} v{version}")
    from methodlab.report import write_report

    print(f"\nreport: {write_report(cfg.tracking.uri)}")
    db = methodlab_home() / "mlflow.db"
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"
          "\n           then open http://127.0.0.1:5000 (experiment 'methodlab', models under 'Models')")
    return 0
