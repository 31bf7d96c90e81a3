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


def demo_roles() -> dict[tuple[str, tuple[str, ...]], dict[str, str]]:
    """The role tags (`methodlab.report.ROLE_TAG` ...) of each run of `demo_plan`, keyed by
    (method, overrides), so the report labels a run by what the demo ran it as (e.g. a
    backbone another method loads) rather than by its method alone. A run that is both a
    method's own and another's prerequisite keeps the role `method` and lists its users."""
    from methodlab.report import PREREQUISITE_FOR_TAG, ROLE_LABEL_TAG, ROLE_TAG, method_label

    roles: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
    users: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in method_names():
        method = get_method(name)
        own = load_config(name, None, list(method.demo_overrides)).method
        for prerequisite, overrides in method.demo_prerequisites:
            made = load_config(prerequisite, None, overrides).tracking.registered_model
            fields = [f for f in method.pretrained_fields
                      if str(getattr(own, f)).startswith((f"models:/{made}@", f"models:/{made}/"))]
            step = (prerequisite, tuple(overrides))
            users.setdefault(step, []).extend(f"{name}:{f}" for f in fields or ["model"])
            roles.setdefault(step, {ROLE_TAG: "prerequisite", ROLE_LABEL_TAG: f"{(fields or ['model'])[0]} for "
                                    f"{name} ({made})"})
        roles[(name, tuple(method.demo_overrides))] = {ROLE_TAG: "method", ROLE_LABEL_TAG: method_label(method)}
        if (plan := baseline_plan(name)) is not None:
            roles[(name, tuple(plan[1]))] = {ROLE_TAG: "baseline", ROLE_LABEL_TAG: f"baseline of {name}: {plan[0]}"}
    for step, used_by in users.items():
        roles[step][PREREQUISITE_FOR_TAG] = ",".join(used_by)
    return roles


def run_demo(extra_overrides: list[str] = ()) -> int:
    from methodlab.tracking import Tracker, ui_link
    from methodlab.train.launch import train

    roles = demo_roles()

    def run(name: str, overrides: list[str], what: str):
        cfg = load_config(name, None, [*overrides, *extra_overrides])
        print(f"\n=== {what} ({cfg.run_name}) ===", flush=True)
        t0 = time.time()
        summary = train(cfg)
        print(summary.line(get_method(name).test_metric), flush=True)
        if (name, tuple(overrides)) in roles:      # (also on a run a second demo finds finished)
            Tracker(cfg.tracking.uri, cfg.tracking.experiment).set_tags(summary.run_id, roles[(name, tuple(overrides))])
        return cfg, summary, time.time() - t0

    from methodlab.report import PREREQUISITE_FOR_TAG, ROLE_LABEL_TAG, ROLE_TAG

    def shown_as(name: str, overrides: list[str]) -> str:
        """A run another method needs reads as such (the demo trains `supervised` twice)."""
        role = roles.get((name, tuple(overrides)), {})
        if role.get(ROLE_TAG) != "prerequisite":
            return name
        users = sorted({user.split(":")[0] for user in role[PREREQUISITE_FOR_TAG].split(",")})
        return f"{name} (for {', '.join(users)})"

    rows = []
    t_start = time.time()
    for name, overrides in demo_plan():
        row_name = shown_as(name, overrides)
        role_label = roles.get((name, tuple(overrides)), {}).get(ROLE_LABEL_TAG)
        cfg, summary, seconds = run(name, overrides, f"{name}: {role_label}" if row_name != name else name)
        method = get_method(name)
        baseline = None
        if (plan := baseline_plan(name)) is not None and list(overrides) == list(method.demo_overrides):
            label, base_overrides = plan
            _, base_summary, _ = run(name, base_overrides, f"{name}: baseline {label}")
            baseline = (label, base_summary.metrics.get(method.test_metric))
        rows.append((row_name, cfg.tracking.registered_model, method.test_metric,
                     summary.metrics.get(method.test_metric), summary.version, baseline, seconds))

    def shown(value) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    baselines = sum(1 for row in rows if row[5])
    print(f"\nmethodlab demo: {len(rows) + baselines} runs ({baselines} of them baselines) in "
          f"{time.time() - t_start:.0f}s")
    width = max([18, *(len(row[0]) + 1 for row in rows)])
    print(f"{'method':{width}s} {'metric':16s} {'value':>8s}  {'baseline on the same task':36s} registered model")
    for row_name, model, metric, value, version, baseline, _ in rows:
        base = f"{shown(baseline[1]):>8s}  {baseline[0]}" if baseline else ""
        print(f"{row_name:{width}s} {metric:16s} {shown(value):>8s}  {base:36s} {model} v{version}")
    from methodlab.report import write_report

    print(f"\nreport: {write_report(cfg.tracking.uri)}")
    db = methodlab_home() / "mlflow.db"
    runs = ui_link("http://127.0.0.1:5000", f"experiments/{Tracker(cfg.tracking.uri, cfg.tracking.experiment).experiment_id}/runs")
    print(f"\nMLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"
          f"\n           then open {runs} (models under 'Models')")
    return 0
