"""`make demo`'s plan: every method runs after its prerequisites, and every method but the plain
supervised baseline is shown next to a baseline trained on the same task (`Method.demo_baseline`),
which follows the method registry, so a new method is checked here by registering."""

from __future__ import annotations

import pytest

import methodlab.methods  # noqa: F401
from methodlab.config import load_config
from methodlab.demo import baseline_plan, demo_plan
from methodlab.registry import get_method, method_names
from methodlab.tracking import flatten_params


def test_every_method_runs_after_what_it_loads():
    plan = [name for name, _ in demo_plan()]
    for name in method_names():
        for prerequisite, _ in get_method(name).demo_prerequisites:
            assert plan.index(prerequisite) < plan.index(name), name


@pytest.mark.parametrize("name", [n for n in method_names() if n != "supervised"])
def test_every_method_has_a_baseline_on_the_same_task_that_differs_only_where_it_says(name):
    plan = baseline_plan(name)
    assert plan is not None, f"{name} has no demo_baseline"
    label, overrides = plan
    method = get_method(name)
    ours = load_config(name, None, list(method.demo_overrides))
    theirs = load_config(name, None, overrides)
    assert theirs.data.dataset == ours.data.dataset and theirs.run_name != ours.run_name
    changed = {k for k, v in flatten_params(theirs.identity()).items() if flatten_params(ours.identity()).get(k) != v}
    said = {o.split("=", 1)[0] for o in method.demo_baseline[1]}
    assert changed and changed <= said, (label, changed, said)
    assert theirs.tracking.register_model is False     # the method's candidate alias stays the method's


def test_the_demo_prints_its_summary_table_once_after_every_run(monkeypatch, capsys):
    """Each run's summary line as it ends, then the table once, then where the report and the UI are."""
    import types

    import methodlab.report
    import methodlab.tracking
    import methodlab.train.launch
    from methodlab.demo import run_demo
    from methodlab.train.launch import RunSummary

    monkeypatch.setattr(methodlab.train.launch, "train", lambda cfg: RunSummary(
        cfg.run_name, "r1", "FINISHED", {get_method(cfg.method_name).test_metric: 0.5}, "m", "1"))
    monkeypatch.setattr(methodlab.report, "write_report", lambda uri: "report.html")
    monkeypatch.setattr(methodlab.tracking, "Tracker", lambda *a: types.SimpleNamespace(set_tags=lambda *a: None,
                                                                                  experiment_id="7"))
    assert run_demo() == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, ln in enumerate(lines) if ln.startswith("method ") and "registered model" in ln]
    summaries = [i for i, ln in enumerate(lines) if ": test_" in ln and "· MLflow run r1" in ln]
    assert len(headers) == 1 and len(summaries) == len(demo_plan()) + sum(
        baseline_plan(n) is not None for n in method_names())
    assert max(summaries) < headers[0] and lines[headers[0] + 1:][-1].startswith("           then open")
    # the second `supervised` run is TOAST's backbone and reads so, in its header and its row
    after = lines[headers[0] + 1:]
    table = [ln.split("  ")[0].strip() for ln in after[:after.index("")]]
    assert "supervised (for toast)" in table and table.count("supervised") == 1
    assert set(table) == {*(n for n in method_names()), "supervised (for toast)"}
    assert any(ln.startswith("=== supervised: backbone for toast (methodlab-vit-source)") for ln in lines)
    assert "experiments/7/runs?workflowType=machine_learning" in lines[-1]
