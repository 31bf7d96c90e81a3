"""Sweeps: space validation (fast, no Ray), every sweep file against its method, and on a local
Ray cluster an ASHA sweep tracked as one MLflow parent with a child per trial, and a sweep whose
driver is killed resuming instead of starting over."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from methodlab.config import load_config
from methodlab.errors import ConfigError
from methodlab.registry import get_method, method_names
from methodlab.sweep import (SweepSpec, SweepSummary, Trial, final_stage_epochs, load_spec, log_ticks, merged_space,
                             metric_plot, parent_note, run_sweep, tick_labels, trial_config, trial_run_name,
                             trials_csv, tune_space, validate_space)
from tests.conftest import ROOT, epochs_logged, tiny

SWEEPS = sorted((Path(ROOT) / "jobs" / "sweeps").glob("*.yaml"))


def _validate(method: str, yaml_path: str | None = None, overrides: list[str] = ()):
    spec, layers = load_spec(method, yaml_path, list(overrides))
    layers = [("defaults", get_method(method).defaults), *layers]
    return spec, validate_space(method, merged_space(method, spec), layers, spec.search.algorithm)


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if the sweep gets as far as starting or joining Ray."""
    import methodlab.train.launch as launch

    def refuse(*a, **k):
        raise AssertionError("the sweep reached Ray; an invalid space must fail before that")
    monkeypatch.setattr(launch, "ensure_ray", refuse)


# ----------------------------------------------------------------------------------------------
# Invalid spaces fail first, with one line naming the key


@pytest.mark.parametrize("override, needle", [
    ("space.train.lrr={loguniform: [1.0e-4, 1.0e-2]}", "space key train.lrr: unknown config key; did you mean train.lr?"),
    ("space.method.label_smothing={uniform: [0.0, 0.2]}", "did you mean method.label_smoothing?"),
    ("space.train.lr={loguniform: [1.0e-2, 1.0e-4]}", "space key train.lr: loguniform low 0.01 > high 0.0001"),
    ("space.train.lr={uniform: [0.5, 0.1]}", "space key train.lr: uniform low 0.5 > high 0.1"),
    ("space.train.lr={logunifrom: [1.0e-4, 1.0e-2]}", "space key train.lr: unknown distribution 'logunifrom'; did you mean loguniform?"),
    ("space.train.lr={loguniform: [0, 1]}", "space key train.lr: loguniform needs low > 0"),
    ("space.train.lr={uniform: [0, 1]}", "space key train.lr: value 0 is not valid"),
    ("space.train.batch_size={choice: [32, 0]}", "space key train.batch_size: value 0 is not valid"),
    ("space.train.optimizer={choice: [adam, lion]}", "space key train.optimizer: value 'lion' is not valid"),
    ("space.train.lr={choice: []}", "space key train.lr: choice takes a non-empty list"),
    ("space.train.lr=0.1", "space key train.lr: a distribution is one of"),
    ("space.train.lr={uniform: [1, 2, 3]}", "space key train.lr: uniform takes [low, high]"),
])
def test_invalid_space_fails_before_any_trial(override, needle, home, no_ray):
    with pytest.raises(ConfigError) as e:
        run_sweep("supervised", None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (home / "runs").exists() and not (home / "mlflow.db").exists()   # no run, no storage


def test_algorithm_and_distribution_mismatch(home, no_ray):
    with pytest.raises(ConfigError, match="space key train.lr: search.algorithm=grid needs finite values"):
        run_sweep("supervised", None, ["search.algorithm=grid"])
    with pytest.raises(ConfigError, match="space key train.batch_size: search.algorithm=optuna cannot sample a grid"):
        run_sweep("supervised", None, ["search.algorithm=optuna", "space.train.batch_size={grid: [32, 64]}"])


def test_sweep_file_errors(tmp_path, home, no_ray):
    bad = tmp_path / "s.yaml"
    bad.write_text("method_name: supervised\nserch: {num_samples: 2}\n")
    with pytest.raises(ConfigError, match="unknown sweep key serch"):
        run_sweep("supervised", str(bad), [])
    bad.write_text("method_name: toast\n")
    with pytest.raises(ConfigError, match="is for method 'toast', not 'supervised'"):
        run_sweep("supervised", str(bad), [])
    with pytest.raises(ConfigError, match="search.num_samples"):
        run_sweep("supervised", None, ["search.num_samples=0"])
    with pytest.raises(ConfigError, match="unknown config key train.epoch"):
        run_sweep("supervised", None, ["train.epoch=3"])


def test_cli_prints_one_line_and_exits_nonzero(home):
    out = subprocess.run([sys.executable, "-m", "methodlab.cli", "sweep", "supervised",
                          "space.train.lrr={uniform: [0.1, 0.2]}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: space key train.lrr: unknown config key; did you mean train.lr?"]


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(1e-6, 1.0), hi=st.floats(1e-6, 1.0), kind=st.sampled_from(["uniform", "loguniform"]))
def test_range_bounds_property(lo, hi, kind):
    """Any range with low <= high over a valid key is accepted as given; low > high never is."""
    override = f"space.train.lr={{{kind}: [{lo!r}, {hi!r}]}}"
    if lo <= hi:
        _, space = _validate("supervised", None, [override])
        assert space["train.lr"] == (kind, [lo, hi])
    else:
        with pytest.raises(ConfigError, match=f"space key train.lr: {kind} low .* > high"):
            _validate("supervised", None, [override])


# ----------------------------------------------------------------------------------------------
# Spaces, overrides, trial configs


def test_overrides_go_to_the_sweep_or_to_every_trial():
    spec, layers = load_spec("supervised", None, ["name=abc", "search.num_samples=3", "train.epochs=2",
                                                  "space.train.weight_decay=null",
                                                  "space.method.arch_kwargs.width={choice: [8, 16]}"])
    assert spec.name == "abc" and spec.search.num_samples == 3
    assert {"train": {"epochs": 2}} in [layer for _, layer in layers]
    space = merged_space("supervised", spec)
    assert "train.weight_decay" not in space                      # null drops a default key
    assert space["method.arch_kwargs.width"] == {"choice": [8, 16]}   # below a dict field: allowed
    assert space["train.lr"] == get_method("supervised").search_space["train.lr"]


def test_tune_space_and_trial_config():
    from ray.tune.search.sample import Categorical, Float

    _, space = _validate("supervised", None, ["space.train.batch_size={grid: [32, 64]}"])
    ts = tune_space(space, "random")
    assert isinstance(ts["train.lr"], Float) and ts["train.batch_size"] == {"grid_search": [32, 64]}
    assert isinstance(tune_space(space, "optuna")["train.lr"], Float)
    _, choices = _validate("supervised", None, ["search.algorithm=grid", "space.train.lr={choice: [0.1, 0.01]}",
                                                "space.train.weight_decay=null"])
    assert tune_space(choices, "grid")["train.lr"] == {"grid_search": [0.1, 0.01]}
    assert not isinstance(tune_space(choices, "random")["train.lr"], dict)
    assert isinstance(tune_space(choices, "random")["train.lr"], Categorical)

    ctx = {"method_name": "supervised", "base_layers": [("base", {"train": {"epochs": 3}})]}
    cfg = trial_config(ctx, {"train.lr": 0.01, "method.arch_kwargs.width": 8}, "sw-abc_00001")
    assert (cfg.train.lr, cfg.train.epochs, cfg.method.arch_kwargs, cfg.train.run_name) == \
        (0.01, 3, {"width": 8}, "sw-abc_00001")
    assert cfg.tracking.register_model is False      # trials never register; the sweep does, once


def test_asha_counts_the_final_stages_epochs_which_train_epochs_sets():
    """ASHA's default max_t is past `final_stage_epochs` (so trials run to their end); for every
    method that is train.epochs, whatever its earlier stages (a teacher, a pretune stage) run."""
    from methodlab.config import load_config

    for name in method_names():
        for extra in ([], ["train.epochs=7"]):
            cfg = load_config(name, None, extra)
            assert final_stage_epochs(cfg) == cfg.train.epochs, name


@pytest.mark.parametrize("method", method_names())
def test_every_method_default_space_validates(method):
    """Registry-driven: a method that lands later is checked the moment it registers."""
    assert get_method(method).search_space, f"{method} declares no default search space"
    _, space = _validate(method)
    assert set(space) == set(get_method(method).search_space)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_files_validate_against_their_method(path):
    data = yaml.safe_load(path.read_text())
    method = data.get("method_name")
    assert method, f"{path.name} names no method_name"
    if method not in method_names():
        pytest.skip(f"method {method!r} is not registered yet")
    spec, space = _validate(method, str(path))
    assert spec.name and space


def test_sweep_files_cover_every_method():
    have = {yaml.safe_load(p.read_text())["method_name"] for p in SWEEPS}
    missing = set(method_names()) - have
    assert not missing, f"no jobs/sweeps/*.yaml for {sorted(missing)}"
    assert {"bad_batches_frd.yaml", "d3gzsl_distill.yaml", "mmanet_distill.yaml"} <= {p.name for p in SWEEPS}


def test_summary_table_and_plot():
    space = {"train.lr": ("loguniform", [1e-4, 1e-2]), "train.batch_size": ("choice", [32, 64])}
    trials = [Trial("a_00000", "s-a_00000", "r0", {"train.lr": 1e-3, "train.batch_size": 32}, 0.9, 3, "FINISHED"),
              Trial("a_00001", "s-a_00001", "r1", {"train.lr": 1e-2, "train.batch_size": 64}, 0.2, 1, "KILLED"),
              Trial("a_00002", "s-a_00002", None, {"train.lr": 5e-3, "train.batch_size": 64}, None, 0, "FAILED")]
    rows = list(csv.DictReader(io.StringIO(trials_csv(trials, space, "val_acc"))))
    assert [r["stopped_early"] for r in rows] == ["false", "true", "false"]
    assert [r["val_acc"] for r in rows] == ["0.9", "0.2", ""]
    assert rows[1]["train.lr"] == "0.01" and rows[0]["status"] == "FINISHED"
    fig = metric_plot(trials, space, "val_acc")
    assert [ax.get_xlabel() for ax in fig.axes] == ["train.lr", "train.batch_size"]
    assert fig.axes[0].get_xscale() == "log"


def _label_boxes(ax) -> list:
    """The window extents of the axis' drawn x tick labels, major and minor, left to right."""
    ax.figure.canvas.draw()
    labels = [t for t in [*ax.get_xticklabels(), *ax.get_xticklabels(minor=True)] if t.get_visible() and t.get_text()]
    return sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)


@settings(max_examples=25, deadline=None)
@given(lo_exp=st.floats(-8, 3), decades=st.floats(0, 8))
def test_log_axis_tick_labels_never_overlap(lo_exp, decades):
    """A loguniform key's panel: 2-5 labelled ticks (one for a range within 0.1%), inside the range, in
    order, with distinct labels that do not run into each other (matplotlib's own log locator
    labels the minor ticks of a short range, and those overlapped)."""
    import matplotlib.pyplot as plt

    lo, hi = 10 ** lo_exp, 10 ** (lo_exp + decades)
    ticks = log_ticks(lo, hi)
    assert 1 <= len(ticks) <= 5 and (len(ticks) >= 2) == (hi > lo * 1.001)
    assert ticks == sorted(set(ticks)) and all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks)
    assert len(set(tick_labels(ticks))) == len(ticks)
    space = {"train.lr": ("loguniform", [lo, hi])}
    trials = [Trial(f"a_{i:05d}", f"a_{i:05d}-s", f"r{i}", {"train.lr": lo * (hi / lo) ** (i / 3)}, 0.1 * i, 1,
                    "FINISHED") for i in range(4)]
    fig = metric_plot(trials, space, "val_acc")
    boxes = _label_boxes(fig.axes[0])
    assert len(boxes) == len(ticks)
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), shown


def test_tick_labels_are_short_and_exact():
    assert tick_labels([1e-4, 2.5e-4, 0.05, 1.0, 250.0, 1.5e4]) == ["1e-4", "2.5e-4", "0.05", "1", "250", "1.5e4"]
    assert tick_labels([1.0, 1.0045]) == ["1", "1.004"]      # the fewest digits that tell them apart
    assert log_ticks(1e-4, 1e-2) == [1e-4, 1e-3, 1e-2]
    assert log_ticks(1.2e-3, 6e-2) == pytest.approx([2e-3, 5e-3, 1e-2, 2e-2, 5e-2])


def test_trial_run_names_lead_with_the_trial_id():
    """MLflow's runs table cuts long names at the end: the part that tells trials apart leads."""
    names = [trial_run_name("supervised-lr-bs-wd-long-sweep-name", f"3f2a1_{i:05d}") for i in range(3)]
    assert [n[:11] for n in names] == ["3f2a1_00000", "3f2a1_00001", "3f2a1_00002"]
    assert all(n.endswith("-supervised-lr-bs-wd-long-sweep-name") for n in names)
    # a name the run config accepts (it becomes the trial's storage directory)
    assert load_config("supervised", None, [f"train.run_name={names[0]}"]).run_name == names[0]


class _Links:
    """Tracker's link methods over a fixed experiment (no store needed)."""
    from methodlab.tracking import Tracker
    experiment_id = "7"
    run_url, model_version_url, ui_url = Tracker.run_url, Tracker.model_version_url, Tracker.ui_url

    def __init__(self, uri):
        self.uri = uri


def test_parent_note_links_the_best_run_and_its_model_version():
    best = Trial("a_00001", "a_00001-s", "run1", {"train.lr": 0.01}, 0.97, 3, "FINISHED")
    s = SweepSummary("s", "supervised", "val_acc", "max", "p", [best], best, "methodlab-supervised", "3")
    note = parent_note(s, _Links("http://user:secret@mlflow.example:5000/"))
    assert "[a_00001-s](http://mlflow.example:5000/#/experiments/7/runs/run1?workflowType=machine_learning)" in note
    assert ("[methodlab-supervised version 3](http://mlflow.example:5000/#/models/methodlab-supervised/versions/3)"
            in note) and "secret" not in note and "val_acc=0.9700 (train.lr=0.01)" in note
    # a local store: links relative to the UI that shows the note
    assert "(#/experiments/7/runs/run1?workflowType=machine_learning)" in parent_note(s, _Links("sqlite:///x/mlflow.db"))
    s.version = s.registered_model = None
    assert "No model was registered" in parent_note(s, _Links("sqlite:///x/mlflow.db"))
    s.best = None
    assert parent_note(s, _Links("sqlite:///x/mlflow.db")).endswith("No trial reported val_acc.")


def test_spec_defaults():
    s = SweepSpec()
    assert (s.search.algorithm, s.search.scheduler.type, s.search.num_samples) == ("random", "asha", 8)


# ----------------------------------------------------------------------------------------------
# On a local Ray cluster


def _runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, max_results=1000)


@pytest.mark.slow
def test_asha_sweep_one_parent_four_children_best_registered(ray_cluster, home, capfd):
    from methodlab.tracking import source_tags

    # One clearly good lr and three hopeless ones: ASHA (keeps the top 1/4 at epoch 1) must stop
    # the hopeless trials that reach the rung after the good one.
    overrides = tiny("supervised", "train.epochs=3", "train.batch_size=32", "data.limit_rows=600",
                     "scaling.num_workers=1", "scaling.cpus_per_worker=0.49",
                     "name=asha4", "search.num_samples=1", "search.max_concurrent_trials=2",
                     "space.train.lr={grid: [0.01, 1.0e-7, 1.0e-7, 1.0e-7]}",
                     "space.train.batch_size=null", "space.train.weight_decay=null",
                     "search.scheduler.grace_period=1", "search.scheduler.reduction_factor=4")
    t0 = time.perf_counter()
    summary = run_sweep("supervised", None, overrides)
    print(summary.line(), f"({time.perf_counter() - t0:.0f}s)")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("methodlab.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert {r.info.run_name for r in children} == {t.run_name for t in summary.trials}
    assert all(t.run_name == f"{t.trial_id}-asha4" for t in summary.trials)     # the trial id leads

    # Stopped trials: tagged, KILLED, fewer epochs; the others FINISHED with every epoch logged once.
    stopped = [r for r in children if r.data.tags.get("methodlab.stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    for r in children:
        epochs = epochs_logged(client, r.info.run_id, "epoch_seconds")
        assert epochs == list(range(1, len(epochs) + 1)), "an epoch was logged twice, or not at all"
        assert r.data.params["train.lr"] in ("0.01", "1e-07")
        # a trial runs in a Tune actor: its Source and User are its sweep's, the driver's
        assert {k: r.data.tags[k] for k in source_tags()} == {k: parent.data.tags[k] for k in source_tags()}
        assert r.data.params["data.dataset"] == parent.data.params["base.data.dataset"] == "digits"
        if r in stopped:
            assert r.info.status == "KILLED" and len(epochs) < 3
        else:
            assert r.data.tags["methodlab.stopped_early"] == "false"
            assert r.info.status == "FINISHED" and len(epochs) == 3

    # The parent's summary: space, scheduler, the trials table and the plot.
    assert json.loads(parent.data.params["space.train.lr"]) == {"grid": [0.01, 1e-7, 1e-7, 1e-7]}
    assert parent.data.tags["methodlab.scheduler"] == "asha"
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "metric_vs_params.png", "summary.json", "config.yaml"} <= files
    local = client.download_artifacts(parent.info.run_id, "trials.csv", str(home))
    table = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert len(table) == 4 and sum(r["stopped_early"] == "true" for r in table) == len(stopped)

    # The best trial is the good lr, registered with alias candidate from its own checkpoint.
    assert summary.best.params["train.lr"] == 0.01 and summary.version is not None
    mv = client.get_model_version_by_alias("methodlab-supervised", "candidate")
    assert mv.run_id == summary.best.run_id == parent.data.tags["methodlab.best_run_id"]
    # The parent links them: tags, and its description (the run page's note) with both links.
    assert (parent.data.tags["methodlab.registered_model"], parent.data.tags["methodlab.registered_version"]) == \
        ("methodlab-supervised", str(mv.version))
    note = parent.data.tags["mlflow.note.content"]
    assert f"(#/experiments/{parent.info.experiment_id}/runs/{mv.run_id}?workflowType=machine_learning)" in note
    assert f"[methodlab-supervised version {mv.version}](#/models/methodlab-supervised/versions/{mv.version})" in note
    from methodlab.models.hub import load_pretrained
    model, spec = load_pretrained("models:/methodlab-supervised@candidate", uri)
    assert spec["arch"] == "cnn"
    # Submitted again, the finished sweep is done (other concurrency included); under the same
    # name with another space it is refused, before anything runs.
    assert run_sweep("supervised", None, [*overrides, "search.max_concurrent_trials=1"]).already_finished
    with pytest.raises(ConfigError, match=r"^sweep asha4 already finished with other values of space\.train\.lr; "
                                          r"set a new name"):
        run_sweep("supervised", None, [*overrides, "space.train.lr={grid: [0.1, 0.2]}"])
    # Stopped trials' placement groups are removed by Ray Train's cleaner, through the state API of
    # this cluster (`ensure_ray`), also with other Ray instances on the machine (other sessions).
    assert _cpus_freed(ray_cluster) == pytest.approx(2.0, abs=0.01)

    # The console: a line per trial event and no Tune status tables; every epoch line of every
    # trial is there, none folded by Ray's dedup into "[repeated Nx across cluster]".
    out = capfd.readouterr()
    text = out.out + out.err
    assert not any(table in text for table in ("== Status ==", "Trial status", "Number of trials", "+----"))
    for t in summary.trials:
        assert f"[asha4] trial {t.trial_id} started: train.lr=" in text
        ended = "stopped early at epoch" if t.stopped_early else "finished after 3 epochs"
        assert f"[asha4] trial {t.trial_id} {ended}" in text, (t, text[-3000:])
        for epoch in range(1, t.epochs + 1):
            assert f"[{t.run_name}] train epoch {epoch} " in text, (t.run_name, epoch)
    assert " reached rung epoch 1: val_acc=" in text
    assert not any("repeated" in ln and "epoch" in ln for ln in text.splitlines())


def _cpus_freed(ray_cluster, timeout: float = 60) -> float:
    """The cluster's free CPUs once the placement groups of stopped trials are removed (Ray
    Train's cleaner takes seconds), or what is free after `timeout`."""
    deadline = time.time() + timeout
    while ray_cluster.available_resources().get("CPU", 0) < 1.99 and time.time() < deadline:
        time.sleep(1)
    return ray_cluster.available_resources().get("CPU", 0)


@pytest.mark.slow
@pytest.mark.faults      # an external fault against a real run: make test-faults
def test_killed_sweep_driver_resumes(ray_cluster, home):
    """A driver killed mid-sweep, submitted again: the finished trial is not run again, the
    unfinished one continues from its Ray Train checkpoint in the same MLflow child run."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "METHODLAB_HOME": str(home), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    # An epoch takes about 0.15 s here and a trial ~3 s, so the kill must come within a second or two
    # of the second trial's second epoch; 20 epochs leave >2 s. (10 epochs and a fixed 1.5 s wait
    # after that epoch let a CI run's second trial finish first.)
    epochs = 20
    args = [sys.executable, "-m", "methodlab.cli", "sweep", "supervised",
            *tiny("supervised", f"train.epochs={epochs}", "train.batch_size=32", "data.limit_rows=600",
                  "scaling.num_workers=1", "scaling.cpus_per_worker=0.49", "name=resume2",
                  "search.num_samples=2", "search.max_concurrent_trials=1", "search.scheduler.type=fifo",
                  "space.train.batch_size=null", "space.train.weight_decay=null")]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    log = open(home.parent / "driver1.log", "w")
    first = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished = second = None
    finished_seen_at = None
    deadline = time.time() + 400
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(0.3)
            # Only once a trial has started (the driver made the MLflow store and the parent run before):
            # two processes creating one SQLite store at once race on its schema migration.
            if "[resume2] trial " not in Path(home.parent / "driver1.log").read_text():
                continue
            client, runs = _runs(uri)
            children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            finished = next((r for r in children if r.info.status == "FINISHED"), None)
            second = next((r for r in children if r.info.status == "RUNNING"), None)
            if finished and finished_seen_at is None:
                finished_seen_at = time.time()
            if finished and second and len(client.get_metric_history(second.info.run_id, "epoch_seconds")) >= 2:
                # Tune saves its experiment state every second (TUNE_GLOBAL_CHECKPOINT_S): the state
                # must have recorded the first trial as done. A trial's start takes far longer than
                # this, so the wait is usually already over.
                time.sleep(max(0.0, finished_seen_at + 1.5 - time.time()))
                _, runs = _runs(uri)
                status = next(r.info.status for r in runs if r.info.run_id == second.info.run_id)
                assert status == "RUNNING", "the second trial finished before the kill; raise epochs"
                break
        assert first.poll() is None, f"the first driver ended early: {Path(home.parent / 'driver1.log').read_text()[-3000:]}"
        assert finished is not None and second is not None, "timed out waiting for the first trial"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    _, before = _runs(uri)
    done_before = next(r for r in before if r.info.run_id == finished.info.run_id)
    ckpts_before = sorted(Path(done_before.data.tags["methodlab.checkpoint_root"]).glob("checkpoint_*"))

    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "restoring from" in out.stdout and "(resumed)" in out.stdout

    client, after = _runs(uri)
    children = [r for r in after if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert len([r for r in after if r.data.tags.get("methodlab.sweep") == "true"]) == 1
    done_after = next(r for r in children if r.info.run_id == finished.info.run_id)
    # The finished trial was not trained again: same checkpoints, no resume, every epoch once.
    # (Its end time may move: if it is the best trial, registering its model re-opens the run.)
    assert sorted(Path(done_after.data.tags["methodlab.checkpoint_root"]).glob("checkpoint_*")) == ckpts_before
    assert "methodlab.resumed_at_epoch" not in done_after.data.tags
    assert epochs_logged(client, done_after.info.run_id, "epoch_seconds") == list(range(1, epochs + 1))
    # The interrupted one continued from its checkpoint, in the same child run, no epoch twice.
    cont = next(r for r in children if r.info.run_id == second.info.run_id)
    assert "methodlab.resumed_at_epoch" in cont.data.tags, out.stdout[-3000:] + out.stderr[-5000:]
    assert int(cont.data.tags["methodlab.resumed_at_epoch"]) >= 1
    assert epochs_logged(client, cont.info.run_id, "epoch_seconds") == list(range(1, epochs + 1))


@pytest.mark.slow
@pytest.mark.faults      # an external fault against a real run: make test-faults
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_sweep_driver_kills_every_trial_keeping_checkpoints_and_it_resumes(ray_cluster, home, signum):
    """SIGINT or SIGTERM to a sweep driver's process group while two trials train: Tune stops both,
    their child runs and the parent end KILLED with their checkpoints kept, one `error:` line names
    the sweep and the resume command, exit 128 + signal; resubmitted, each trial continues from its
    checkpoint in its own child run, every epoch once."""
    from methodlab.train import checkpoints
    from methodlab.train.core import read_checkpoint
    from methodlab.train.lease import LEASE_FILE

    # Both trials must run at once: a sweep killed just before (the test above, next to this one
    # in `make test-faults`) may still hold its trials' CPUs for a few seconds.
    assert _cpus_freed(ray_cluster) == pytest.approx(2.0, abs=0.01)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "METHODLAB_HOME": str(home)}
    # Long enough that neither trial can finish between the check below and the stop (an idle
    # machine trains an epoch in ~0.1 s: with 40, one trial once finished first).
    epochs, name = 150, f"sig{signum}"
    overrides = tiny("supervised", f"train.epochs={epochs}", "train.batch_size=32", "data.limit_rows=600",
                     "scaling.num_workers=1", "scaling.cpus_per_worker=0.49", f"name={name}",
                     "search.num_samples=2", "search.max_concurrent_trials=2", "search.scheduler.type=fifo",
                     "space.train.batch_size=null", "space.train.weight_decay=null")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    log_path = home.parent / "sweep-driver.log"
    with open(log_path, "w") as log:      # (a file, not a pipe: Ray's log lines must never block it)
        driver = subprocess.Popen([sys.executable, "-m", "methodlab.cli", "sweep", "supervised", *overrides],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    try:
        while True:
            assert driver.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
            if f"[{name}] trial " not in log_path.read_text():   # (the store and parent exist by then)
                continue
            _, runs = _runs(uri)
            children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            if len(children) == 2 and all(r.info.status == "RUNNING" and checkpoints.latest(
                    f"{r.data.tags['methodlab.checkpoint_root']}") for r in children):
                break
        os.killpg(driver.pid, signum)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert driver.returncode == 128 + signum, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith(f"error: sweep {name} interrupted by {signal.Signals(signum).name}: 2 running "
                                "trial(s) stopped and marked KILLED ("), errors
    assert "resume with: methodlab sweep supervised " in errors[0] and f"name={name}" in errors[0], errors

    client, runs = _runs(uri)
    parent = next(r for r in runs if r.data.tags.get("methodlab.sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED" and len(children) == 2
    stopped_at = {}
    for r in children:
        assert r.info.status == "KILLED" and r.info.run_name in errors[0]
        root = r.data.tags["methodlab.checkpoint_root"]
        latest = checkpoints.latest(root)
        assert latest and checkpoints.problem(latest) is None        # its last checkpoint, intact
        stopped_at[r.info.run_id] = read_checkpoint(latest)["history_step"]
        assert stopped_at[r.info.run_id] < epochs
        assert not Path(root, LEASE_FILE).exists()                   # its lease dropped by the driver
    assert not (home / "runs" / name / LEASE_FILE).exists()

    summary = run_sweep("supervised", None, overrides)                # resubmitted (in-process)
    assert summary.restored
    client, after = _runs(uri)
    assert next(r for r in after if r.info.run_id == parent.info.run_id).info.status == "FINISHED"
    again = [r for r in after if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_id for r in again} == set(stopped_at) and len(after) == 3
    for r in again:
        assert r.info.status == "FINISHED"
        assert int(r.data.tags["methodlab.resumed_at_epoch"]) >= 1
        assert epochs_logged(client, r.info.run_id, "epoch_seconds") == list(range(1, epochs + 1))


@settings(max_examples=200, deadline=None)
@given(cpus=st.floats(0, 64), gpus=st.floats(0, 16), workers=st.integers(1, 8),
       cpw=st.sampled_from([0.25, 0.5, 1.0, 2.0]), gpw=st.sampled_from([0.25, 0.5, 1.0]), use_gpu=st.booleans())
def test_concurrent_trials_fit_every_resource_and_one_more_would_not(cpus, gpus, workers, cpw, gpw, use_gpu):
    from methodlab.sweep import trial_resources, trials_that_fit

    cfg = load_config("supervised", None, [f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpw}",
                                           f"scaling.gpus_per_worker={gpw}", f"scaling.use_gpu={str(use_gpu).lower()}"])
    need, total = trial_resources(cfg), {"CPU": cpus, "GPU": gpus}
    assert ("GPU" in need) == use_gpu
    n = trials_that_fit(total, need)
    if all(total[k] + 1e-9 >= v for k, v in need.items()):          # at least one trial fits
        assert all(n * v <= total[k] + 1e-6 for k, v in need.items())
        assert any((n + 1) * v > total[k] + 1e-9 for k, v in need.items())
    else:
        assert n == 1          # refused by the capacity check, not by concurrency


@pytest.mark.slow
def test_sweep_concurrency_counts_fake_gpus_on_a_real_cluster(tmp_path):
    """On a Ray cluster with 8 CPUs and 2 (fake) GPUs, 1-GPU trials run 2 at a time, not the 5 the
    CPUs would allow, and asking for 3 is refused naming the GPUs."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import ray\n"
        "import methodlab.methods\n"
        "from methodlab.config import load_config\n"
        "from methodlab.errors import ConfigError\n"
        "from methodlab.sweep import _concurrency, load_spec\n"
        "ray.init(address='local', num_cpus=8, num_gpus=2, include_dashboard=False)\n"
        "over = ['scaling.num_workers=1', 'scaling.use_gpu=true', 'scaling.cpus_per_worker=1']\n"
        "spec, _ = load_spec('supervised', None, over)\n"
        "print('fit', _concurrency(spec, load_config('supervised', None, over)))\n"
        "spec, _ = load_spec('supervised', None, [*over, 'search.max_concurrent_trials=3'])\n"
        "try:\n"
        "    _concurrency(spec, load_config('supervised', None, over))\n"
        "except ConfigError as e:\n"
        "    print('refused', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.path.join(ROOT, "platform")
    out = subprocess.run([sys.executable, str(probe)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "fit 2" in lines
    refused = next(ln for ln in lines if ln.startswith("refused"))
    assert "3 GPUs (1 per trial) but the cluster has 2" in refused and "CPUs" not in refused


def test_a_stopped_trial_that_fails_after_the_driver_marked_it_killed_stays_killed(tmp_path):
    """CI saw a stopped trial's run end FAILED after the sweep driver had marked it KILLED: Tune's
    fit returned while the trial's failure path still ran. A trial's failure leaves a run that is
    no longer RUNNING alone (`Tracker.end_run_if_running`), and the driver, watching for
    `SETTLE_S`, marks KILLED again the one that read RUNNING just before it was marked."""
    import threading

    from methodlab.sweep import _settle_stopped
    from methodlab.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "settle")
    parent = tracker.start_run("sweep", {}, {}, "")
    early, late, failed_before = (tracker.start_run(n, {}, {}, "", parent_run_id=parent)
                                  for n in ("early", "late", "failed-before"))
    tracker.end_run(failed_before, "FAILED")                  # a real failure, before the stop
    since_ms = int(time.time() * 1000) + 1
    time.sleep(0.01)
    for run_id in (early, late):
        tracker.end_run(run_id, "KILLED")                     # the driver's marks
    tracker.end_run_if_running(early, "FAILED")               # a trial's failure after them: no effect
    assert tracker.client.get_run(early).info.status == "KILLED"

    def trial_that_read_running_before_the_mark():
        time.sleep(0.5)
        tracker.end_run(late, "FAILED")
    writer = threading.Thread(target=trial_that_read_running_before_the_mark)
    writer.start()
    _settle_stopped(tracker, parent, since_ms, settle_s=1.5)
    writer.join()
    status = {r: tracker.client.get_run(r).info.status for r in (early, late, failed_before)}
    assert status == {early: "KILLED", late: "KILLED", failed_before: "FAILED"}
    running = tracker.start_run("running", {}, {}, "", parent_run_id=parent)
    tracker.end_run_if_running(running, "FAILED")             # a run nothing ended: FAILED
    assert tracker.client.get_run(running).info.status == "FAILED"
