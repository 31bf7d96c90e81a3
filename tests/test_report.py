"""`methodlab report` renders runs and benchmark results from MLflow into one self-contained page:
the claim table first, then one section per method (its runs labelled by role, one chart per
figure family), then the infrastructure benchmarks; committed results are recorded as runs first."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from methodlab.config import load_config
from methodlab.demo import demo_plan, demo_roles
from methodlab.registry import get_method, method_names
from methodlab.report import (PREREQUISITE_FOR_TAG, ROLE_LABEL_TAG, ROLE_TAG, collect, figure_families,
                              write_report)
from methodlab.report.record import RECORDED_COMMIT_TAG, RECORDED_FROM_TAG, file_commit, record_committed
from methodlab.tracking import BENCHMARK_TAG, METHOD_TAG, Tracker

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402  (bench/common.py: how benchmarks record)
import quality  # noqa: E402  (bench/quality.py: how claims are made)


def _run(tracker, name, method, metrics, tags=(), params=()):
    run_id = tracker.start_run(name, dict(params), {METHOD_TAG: method, **dict(tags)}, "x: 1\n")
    tracker.log_metrics(run_id, metrics, 0)
    tracker.end_run(run_id, "FINISHED")
    return run_id


def _results(tmp_path) -> Path:
    """A results folder as bench/ writes it: a quality table (made by bench/quality.py's own
    functions), one method benchmark with two figure families and one infrastructure benchmark."""
    out = tmp_path / "results"
    out.mkdir()
    ours = quality.row("toast", "toast", "target test_acc", [0.61, 0.63, 0.62], "digits_transfer")
    theirs = quality.row("toast", "finetune", "target test_acc", [0.55, 0.56, 0.54], "digits_transfer")
    pre = quality.Precondition("the backbone transfers", "0.6 vs 0.3", True)
    claims = [quality.claim("TOAST beats full fine-tuning (digits_transfer)", ours, theirs, pre)]
    payloads = {
        "quality": {"benchmark": "quality", "device": "CPU", "time": "t0", "figures": [],
                    "quality": [ours, theirs], "claims": claims, "counts": quality.counts(claims), "confidence": 0.95},
        "toast": {"benchmark": "toast", "device": "CPU", "time": "t1", "figures": [
            {"name": "latency_toast", "ratio": 1.2, "baseline": "finetune step", "detail": {"ms": 3.0}, "goal": ""},
            {"name": "latency_linear", "ratio": 0.4, "baseline": "finetune step", "detail": {}, "goal": ""},
            {"name": "speedup_d64", "ratio": 2.0e4, "baseline": "scipy", "detail": {}, "goal": ">= 100"},
            {"name": "speedup_d8", "ratio": 3.0, "baseline": "scipy", "detail": {}, "goal": ""}]},
        "zz_infra": {"benchmark": "zz_infra", "device": "CPU", "time": "t2", "figures": [
            {"name": "epoch_1worker", "ratio": 1.01, "baseline": "plain torch loop", "detail": {}, "goal": "<= 1.05"},
            {"name": "epoch_2worker", "ratio": 1.03, "baseline": "plain torch loop", "detail": {}, "goal": "<= 1.05"}]},
    }
    for name, payload in payloads.items():
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return out


@pytest.fixture()
def stores(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("METHODLAB_BENCH_TRACKING_URI", uri)
    return uri, _results(tmp_path)


def test_report_leads_with_the_claims_then_methods_then_infrastructure(stores, tmp_path):
    uri, results = stores
    runs = Tracker(uri, "methodlab")
    _run(runs, "toast-abc", "toast", {"test_acc": 0.4222}, {ROLE_TAG: "method", ROLE_LABEL_TAG: "toast",
                                                           "methodlab.registered_version": "3"})
    html = write_report(uri, str(tmp_path / "r.html"), ui_url="http://127.0.0.1:5000", results_dir=results).read_text()
    claims, toast, infra = (html.index(s) for s in ('id="claim-table"', 'id="method-toast"', 'id="infrastructure"'))
    assert claims < toast < infra < html.index('id="bench-zz_infra"')
    assert html.index('id="bench-toast"') < infra                  # a method's benchmark is in its section
    table = html[claims:html.index("</table>", claims)]
    assert "TOAST beats full fine-tuning" in table and "held" in table
    assert "0.6200 ± 0.0100" in table and "0.5500 ± 0.0100" in table and "3/3" in table
    assert "toast-abc" in html and "0.4222" in html
    # every chart names its run, and links it where a UI serves the store
    bench = Tracker(uri, "methodlab-bench")
    toast_run = next(r for r in bench.client.search_runs([bench.experiment_id]) if r.data.tags[BENCHMARK_TAG] == "toast")
    assert f"#/experiments/{bench.experiment_id}/runs/{toast_run.info.run_id}" in html
    assert html.count("<figcaption>") == len(re.findall(r'<img [^>]*src="data:image/png;base64,', html))
    assert not re.search(r'src="(?!data:)', html)                         # nothing external
    # one chart per figure family and unit: the speed-ups (1e4) are not drawn with the latency ratios
    assert html.count("<figcaption>") == 1 + 2 + 1    # quality (toast, one task) + 2 toast families + infra


def test_a_run_is_shown_by_its_role_not_its_method(stores, tmp_path):
    """The demo trains `supervised` twice: the baseline and, later, the ViT TOAST starts from. The
    supervised section's baseline row is the baseline's value, the ViT is shown as TOAST's backbone."""
    uri, results = stores
    runs = Tracker(uri, "methodlab")
    _run(runs, "supervised-base", "supervised", {"test_acc": 0.9694},
         {ROLE_TAG: "method", ROLE_LABEL_TAG: "supervised baseline", PREREQUISITE_FOR_TAG: "canonicalization:predictor"},
         {"tracking.registered_model": "methodlab-supervised"})
    _run(runs, "supervised-vit", "supervised", {"test_acc": 0.8778},
         {ROLE_TAG: "prerequisite", ROLE_LABEL_TAG: "backbone for toast (methodlab-vit-source)",
          PREREQUISITE_FOR_TAG: "toast:backbone"}, {"tracking.registered_model": "methodlab-vit-source"})
    # a run without role tags (an older store): its role is read from its params
    _run(runs, "toast-base", "toast", {"test_acc": 0.6222}, (),
         {"tracking.register_model": "False", "tracking.registered_model": "methodlab-toast"})
    sections = {s["name"]: s["runs"] for s in collect(uri, record=False, results_dir=results)["sections"]}
    first = sections["supervised"][0]
    assert (first["label"], first["value"], first["role"]) == ("supervised baseline", 0.9694, "method")
    assert [(r["label"], r["value"]) for r in sections["toast"]] == [
        ("baseline of toast: full fine-tuning", 0.6222), ("backbone for toast (methodlab-vit-source)", 0.8778)]
    assert sections["toast"][0]["inferred"] and not sections["toast"][1]["inferred"]
    assert [r["label"] for r in sections["canonicalization"]] == ["predictor for canonicalization (methodlab-supervised)"]


def test_every_demo_run_has_a_role_and_every_method_one_own_run():
    roles = demo_roles()
    plan = [(name, tuple(overrides)) for name, overrides in demo_plan()]
    assert set(plan) <= set(roles)
    for name in method_names():
        own = [k for k, tags in roles.items() if k[0] == name and tags[ROLE_TAG] == "method"]
        assert own == [(name, tuple(get_method(name).demo_overrides))]
    for (name, overrides), tags in roles.items():
        for use in filter(None, tags.get(PREREQUISITE_FOR_TAG, "").split(",")):
            consumer, field = use.split(":")
            made = load_config(name, None, list(overrides)).tracking.registered_model
            uri = getattr(load_config(consumer, None, list(get_method(consumer).demo_overrides)).method, field)
            assert uri.startswith(f"models:/{made}@"), (use, uri, made)


def test_the_demo_tags_each_run_so_the_report_shows_the_supervised_baseline_not_the_vit_source(
        stores, home, monkeypatch):
    """`make demo` end to end with `train` recording each run into MLflow instead of training it:
    the demo's tags reach the runs, and each method's row is its own run (the issue: the
    supervised row showed the ViT TOAST starts from, trained later, 0.8778 for 0.9694)."""
    import methodlab.report as report
    import methodlab.train.launch as launch
    from methodlab.demo import baseline_plan, run_demo
    from methodlab.train.launch import RunSummary

    def record(cfg):
        metric = get_method(cfg.method_name).test_metric
        value = 0.8778 if cfg.tracking.registered_model == "methodlab-vit-source" else 0.9694
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        run_id = _run(tracker, cfg.run_name, cfg.method_name, {metric: value}, (), {
            "tracking.registered_model": cfg.tracking.registered_model,
            "tracking.register_model": str(cfg.tracking.register_model)})
        return RunSummary(cfg.run_name, run_id, "FINISHED", {metric: value}, cfg.tracking.registered_model, None)

    monkeypatch.setattr(launch, "train", record)
    monkeypatch.setattr(report, "RESULTS", stores[1])       # the demo's report records these
    assert run_demo() == 0
    sections = {s["name"]: s["runs"] for s in collect(load_config("supervised", None, []).tracking.uri,
                                                      record=False)["sections"]}
    for name in method_names():
        method = get_method(name)
        first = sections[name][0]
        assert not first["inferred"] and first["role"] == "method"
        assert first["run_name"] == load_config(name, None, list(method.demo_overrides)).run_name
        if (plan := baseline_plan(name)) is not None:
            base = sections[name][1]
            assert (base["role"], base["run_name"]) == ("baseline", load_config(name, None, plan[1]).run_name)
    assert (sections["supervised"][0]["label"], sections["supervised"][0]["value"]) == ("supervised baseline", 0.9694)
    vit = [r for r in sections["toast"] if r["role"] == "prerequisite"]
    assert [(r["label"], r["value"]) for r in vit] == [("backbone for toast (methodlab-vit-source)", 0.8778)]


def test_committed_results_are_recorded_once_with_their_file_and_commit(stores):
    uri, results = stores
    created = record_committed(results, uri)
    assert sorted(n for n, _ in created) == ["quality", "toast", "zz_infra"]
    assert record_committed(results, uri) == []                     # same bytes: not again
    bench = Tracker(uri, "methodlab-bench")
    tags = bench.client.get_run(created[0][1]).data.tags
    assert tags[RECORDED_FROM_TAG].endswith(f"{created[0][0]}.json") and tags[RECORDED_COMMIT_TAG]
    (results / "toast.json").write_text((results / "toast.json").read_text().replace("1.2", "1.3"))
    assert [n for n, _ in record_committed(results, uri)] == ["toast"]
    # a committed file knows the commit that last changed it
    real = BENCH / "results" / "quality.json"
    assert re.fullmatch(r"[0-9a-f]{40}(\+modified)?", file_commit(real))


def test_a_benchmark_run_is_not_recorded_again_from_its_own_file(stores, monkeypatch):
    uri, _ = stores
    out = Path(uri[len("sqlite:///"):]).parent / "fresh"
    monkeypatch.setattr(common, "RESULTS", out)
    common.write_results("zz_fresh", [common.Figure("f", 1.5, "base")])
    assert record_committed(out, uri) == []


_names = st.lists(st.text("abc_", min_size=1, max_size=6), min_size=1, max_size=8, unique=True)


@given(_names, st.lists(st.sampled_from(["scipy", "plain loop", "score: accuracy"]), min_size=8, max_size=8))
def test_figure_families_never_mix_baselines_and_keep_every_figure(names, baselines):
    figures = [{"name": n, "ratio": 1.0, "baseline": b} for n, b in zip(names, baselines)]
    families = figure_families(figures)
    assert sorted(f["name"] for fam in families for f in fam["figures"]) == sorted(names)
    for fam in families:
        assert len({f["baseline"] for f in fam["figures"]}) == 1
        assert all(f["label"] for f in fam["figures"])
    assert len(families) == len({f["baseline"] for f in figures})
