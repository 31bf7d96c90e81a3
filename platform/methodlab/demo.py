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


def run_demo(extra_overrides: list[str] = ()) -> int:
    from methodlab.train.launch import train

    rows = []
    t_start = time.time()
    for name, overrides in demo_plan():
        cfg = load_config(name, None, [*overrides, *extra_overrides])
        method = get_method(name)
        print(f"\n=== {name} ({cfg.run_name}) ===", flush=True)
        t0 = time.time()
        summary = train(cfg)
        print(summary.line(method.test_metric), flush=True)
        rows.append((name, cfg.tracking.registered_model, method.test_metric,
                     summary.metrics.get(method.test_metric), summary.version, time.time() - t0))

    print(f"\nmethodlab demo: {len(rows)} runs in {time.time() - t_start:.0f}s")
    print(f"{'method':18s} {'metric':22s} {'value':>8s}  registered model")
    for name, model, metric, value, version, _ in rows:
        shown = f"{value:.4f}" if value is not None else "n/a"
        print(f"{name:18s} {metric:22s} {shown:>8s}  {model} v{version}")
    from methodlab.report import write_report

    print(f"\nreport: {write_report(cfg.tracking.uri)}")
    db = methodlab_home() / "mlflow.db"
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"
          "\n           then open http://127.0.0.1:5000 (experiment 'methodlab', models under 'Models')")
    return 0
