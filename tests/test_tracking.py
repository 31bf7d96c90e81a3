"""Params flattening and redaction, the registry's promote rule (against a real SQLite store)."""

from __future__ import annotations

import contextlib
import functools
import itertools
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from methodlab.tracking import MAX_PARAM_KEY, MAX_PARAM_VALUE, REDACTED, Tracker, flatten_params
from tests.conftest import epochs_logged

KEYS = st.text("abcdefgh_", min_size=1, max_size=6)
LEAVES = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=50))
TREES = st.recursive(st.dictionaries(KEYS, LEAVES, max_size=4),
                     lambda inner: st.dictionaries(KEYS, inner, min_size=1, max_size=3), max_leaves=12)


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@settings(max_examples=80, deadline=None)
@given(tree=TREES)
def test_flatten_keeps_every_leaf_under_its_dotted_key(tree):
    flat = flatten_params(tree)
    leaves = dict(_leaves(tree))
    assert set(flat) == set(leaves)
    for key, value in leaves.items():
        assert flat[key] == (str(value) if not isinstance(value, dict) else "{}")


@settings(max_examples=50, deadline=None)
@given(secret=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=8, max_size=40),
       key=st.sampled_from(["aws_secret_access_key", "password", "api_token", "AccessKey", "db_credentials"]))
def test_secrets_never_reach_params(secret, key):
    flat = flatten_params({"storage": {key: secret, "path": f"postgresql://user:{secret}@db:5432/x"}})
    joined = " ".join(f"{k}={v}" for k, v in flat.items())
    assert secret not in joined
    assert flat[f"storage.{key}"] == REDACTED
    assert flat["storage.path"] == f"postgresql://user:{REDACTED}@db:5432/x"


@settings(max_examples=30, deadline=None)
@given(secret=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=8, max_size=40),
       scheme=st.sampled_from(["postgresql", "mysql+pymysql", "https", "s3"]))
def test_secrets_never_reach_saved_configs(secret, scheme):
    """The resolved config as saved with a run (MLflow's config.yaml, each checkpoint's copy) and
    as `train --print-config` shows it: a URI's password is replaced, the rest kept."""
    from methodlab.config import load_config

    cfg = load_config("supervised", None, [f"tracking.uri={scheme}://user:{secret}@db:5432/x"])
    text = cfg.to_yaml()
    assert secret not in text and f"{scheme}://user:{REDACTED}@db:5432/x" in text


def test_the_logged_config_artifact_is_redacted(tmp_path):
    # Also for texts that did not come from RunConfig.to_yaml (a sweep's spec).
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "redact")
    run_id = tracker.start_run("r", {}, {}, "base:\n  uri: postgresql://user:hunter2pw@db/x\n")
    logged = Path(tracker.client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "hunter2pw" not in logged and f"postgresql://user:{REDACTED}@db/x" in logged


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 3 * MAX_PARAM_VALUE), klen=st.integers(1, 400))
def test_params_respect_mlflow_limits(n, klen):
    flat = flatten_params({"k" * klen: "v" * n})
    (key, value), = flat.items()
    assert len(key) <= MAX_PARAM_KEY and len(value) <= MAX_PARAM_VALUE
    assert value == "v" * n or (n > MAX_PARAM_VALUE and value.endswith("..."))


def _register(tracker, name, acc):
    run_id = tracker.start_run(f"r{acc}", {}, {}, "x: 1\n")
    tracker.log_metrics(run_id, {"test_acc": acc}, 0)
    model = torch.nn.Linear(3, 2)
    spec = {"arch": "linear-test", "kwargs": {}}
    version = tracker.log_model(run_id, model, spec, torch.zeros(2, 3).numpy(), name, {"test_acc": acc})
    tracker.end_run(run_id, "FINISHED")
    return version


def test_promote_moves_champion_only_when_better(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "promote-test")
    v1 = _register(tracker, "m", 0.8)
    moved, msg = tracker.promote("m", "test_acc", "max")
    assert moved and f"v{v1} is now champion" in msg
    _register(tracker, "m", 0.7)                       # worse candidate
    moved, msg = tracker.promote("m", "test_acc", "max")
    assert not moved and "does not beat champion" in msg
    assert str(tracker.client.get_model_version_by_alias("m", "champion").version) == v1
    v3 = _register(tracker, "m", 0.9)
    moved, _ = tracker.promote("m", "test_acc", "max")
    assert moved and str(tracker.client.get_model_version_by_alias("m", "champion").version) == v3
    version = tracker.client.get_model_version("m", v3)
    assert version.tags["test_acc"] == "0.9"


def test_two_first_commands_on_a_fresh_sqlite_store_both_succeed(tmp_path):
    """MLflow creates a fresh SQLite store's tables on first use; two commands doing that at
    once crashed one of them (`table _alembic_tmp_experiments already exists`). Both processes
    here wait for the same instant, then run `methodlab promote` (which opens the store and
    refuses: no candidate yet), so both reach that one-line refusal."""
    import os
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    start_at = time.time() + 6           # after both interpreters have imported methodlab and MLflow
    code = ("import sys, time; from methodlab.cli import main; import mlflow; "
            f"time.sleep(max(0.0, {start_at} - time.time())); "
            f"sys.exit(main(['promote', 'm', '--tracking-uri', {uri!r}]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert (rc, err.strip()) == (2, "error: registered model 'm' has no candidate; train a run first "
                                        "or pass --version")


@settings(deadline=None)
@given(locked=st.integers(0, 12), other=st.booleans())
def test_a_locked_sqlite_write_is_retried_and_nothing_else_is(locked, other):
    from unittest import mock

    from methodlab import tracking

    with mock.patch.object(tracking.time, "sleep", lambda s: None):
        _check_retry(tracking, locked, other)


def _check_retry(tracking, locked: int, other: bool) -> None:
    calls = []

    def write(x, y=0):
        calls.append(1)
        if other:
            raise ValueError("no such table")
        if len(calls) <= locked:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return x + y

    if other:
        with pytest.raises(ValueError):
            tracking.retry_locked(write, 1, y=2)
        assert len(calls) == 1
    elif locked < tracking.LOCKED_ATTEMPTS:
        assert tracking.retry_locked(write, 1, y=2) == 3 and len(calls) == locked + 1
    else:
        with pytest.raises(RuntimeError, match="database is locked"):
            tracking.retry_locked(write, 1, y=2)
        assert len(calls) == tracking.LOCKED_ATTEMPTS


def test_sixteen_writers_on_one_sqlite_store_lose_no_write(tmp_path):
    """What 16 trials and their sweep driver do to one SQLite file, at once: every process starts
    a run and writes tags, params and metrics in separate transactions; none may fail."""
    import os
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "methodlab")                         # the tables, created once
    start_at = time.time() + 8
    code = ("import sys, time; from methodlab.tracking import Tracker; "
            f"t = Tracker({uri!r}, 'methodlab'); time.sleep(max(0.0, {start_at} - time.time())); "
            "r = t.start_run(f'w{sys.argv[1]}', {'a': '1'}, {}, 'x: 1\\n'); "
            "[t.set_tags(r, {f'k{i}': str(i)}) or t.log_metrics(r, {'m': float(i)}, i) for i in range(15)]; "
            "t.end_run(r, 'FINISHED')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(16)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * 16, [err[-500:] for rc, err in results if rc]
    tracker = Tracker(uri, "methodlab")
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=100)
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert len(tracker.client.get_metric_history(r.info.run_id, "m")) == 15


def test_a_run_opens_as_a_training_run_with_its_dataset_as_input(home):
    """MLflow's UI: the experiment is a training one (not the GenAI overview), and the run's
    Dataset column comes from the dataset logged as its input (name, digest, source)."""
    from methodlab.config import load_config
    from methodlab.data import resolve_dataset
    from methodlab.train.launch import start_or_resume

    cfg = load_config("supervised")
    info = resolve_dataset("digits", cfg.data.root)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run_id = start_or_resume(tracker, cfg, info, None)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]
    run = tracker.client.get_run(run_id)
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "digits" and len(logged.dataset.digest) == 16
    assert info.uri in logged.dataset.source and run.data.params["data.uri"] == info.uri
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
    # the same manifest gives the same digest: a second run of the dataset is comparable
    again = start_or_resume(tracker, load_config("supervised", None, ["train.lr=1e-2"]), info, None)
    assert tracker.client.get_run(again).inputs.dataset_inputs[0].dataset.digest == logged.dataset.digest


def test_a_run_records_the_dataset_it_uses_and_the_values_it_is_compared_by(home):
    """data.dataset is logged as the dataset used (the method's default when it is empty, as the
    tag says), the derived name is unchanged, and a finished run compares equal to its config:
    also one logged before the resolved name was, with data.dataset=''."""
    from methodlab.config import load_config
    from methodlab.data import resolve_dataset
    from methodlab.tracking import DATASET_TAG, differing_params
    from methodlab.train.launch import changed_values, start_or_resume

    cfg = load_config("supervised")
    assert cfg.data.dataset == cfg.identity()["data"]["dataset"] == ""    # what the derived name hashes (test_config)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    run = tracker.client.get_run(start_or_resume(tracker, cfg, resolve_dataset("digits", cfg.data.root), None))
    assert run.data.params["data.dataset"] == run.data.tags[DATASET_TAG] == "digits"
    assert changed_values(cfg, tracker.find_run(cfg.run_name)) == {}
    explicit = load_config("supervised", None, ["data.dataset=digits", f"train.run_name={cfg.run_name}"])
    assert changed_values(explicit, tracker.find_run(cfg.run_name)) == {}
    other = load_config("supervised", None, ["data.dataset=shapes_source", f"train.run_name={cfg.run_name}"])
    assert changed_values(other, tracker.find_run(cfg.run_name)) == {"data.dataset": "shapes_source"}
    # a run (or sweep parent) of before: '' was the default, and matches the name recorded now
    assert differing_params({"data.dataset": "digits", "base.data.dataset": "digits"},
                            {"data.dataset": "", "base.data.dataset": ""}) == {}
    assert differing_params({"train.lr": "0.1"}, {"train.lr": ""}) == {"train.lr": "0.1"}


def test_no_test_only_key_reaches_params(home, monkeypatch):
    """Every param of a run is a key of the config models (plus the two the driver derives), and
    no config model has a fault-injection key (`train/faults.py`): with faults set, a real run's
    params hold none of them, for every method's config."""
    import dataclasses

    from methodlab.config import load_config
    from methodlab.data import resolve_dataset
    from methodlab.registry import get_method, method_names
    from methodlab.train.faults import ENV, Faults
    from methodlab.train.launch import start_or_resume

    faults = {f.name for f in dataclasses.fields(Faults)}
    monkeypatch.setenv(ENV, ",".join(f"{name}=1" for name in faults))
    for name in method_names():
        cfg = load_config(name)
        keys = set(flatten_params(cfg.recorded()))
        assert not {k for k in keys if k.rsplit(".", 1)[-1] in faults}, name
        if name == "supervised":      # one real run: what reaches MLflow is exactly those keys
            tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
            info = resolve_dataset(get_method(name).default_dataset, cfg.data.root)
            params = tracker.client.get_run(start_or_resume(tracker, cfg, info, None)).data.params
            assert set(params) == keys | {"train.global_batch_size", "data.uri"}


def test_every_run_has_mlflows_source_and_user_never_a_credential(home, monkeypatch):
    """The runs table's Source and User: the command up to its first key=value (a value may be a
    secret), LOCAL or the Ray job; the login name or the submitter's; a trial takes its sweep's."""
    import json

    from methodlab.provenance import USER_ENV
    from methodlab.tracking import RAY_JOB_ENV, source_tags

    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.setenv("LOGNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "svc-token-user")
    monkeypatch.setattr("sys.argv", ["/venv/bin/methodlab", "train", "supervised", "tracking.uri=http://u:pw@h",
                                     "-c", "x.yaml"])
    tracker = Tracker(f"sqlite:///{home}/m.db", "e")
    parent = tracker.start_run("p", {}, {}, "")
    tags = tracker.client.get_run(parent).data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"], tags["mlflow.user"]) == \
        ("methodlab train supervised", "LOCAL", "bob")
    assert source_tags(["/repo/platform/methodlab/cli.py", "sweep", "toast", "name=s"])["mlflow.source.name"] == \
        "methodlab sweep toast"

    # A Ray job: its id and the submitter `methodlab submit` sent; a trial (another process,
    # whose command line is Ray's worker) has its parent's source and user.
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    monkeypatch.setenv(USER_ENV, "alice")
    monkeypatch.setattr("sys.argv", ["jobs/train.py", "supervised"])
    job = tracker.client.get_run(tracker.start_run("j", {}, {}, "")).data.tags
    assert (job["mlflow.source.name"], job["mlflow.source.type"], job["mlflow.user"]) == \
        ("ray job raysubmit_1: train.py supervised", "JOB", "alice")
    monkeypatch.setattr("sys.argv", ["/ray/default_worker.py", "--node-ip-address=1"])
    monkeypatch.setenv(USER_ENV, "ray")
    child = tracker.client.get_run(tracker.start_run("c", {}, {}, "", parent_run_id=parent)).data.tags
    assert {k: child[k] for k in source_tags()} == {k: tags[k] for k in source_tags()}


EPOCH_STEPS = st.lists(st.integers(1, 500), min_size=0, max_size=40).map(
    lambda gaps: dict(zip(range(1, len(gaps) + 1), itertools.accumulate(gaps))))


@settings(max_examples=200, deadline=None)
@given(steps=EPOCH_STEPS, dropped=st.sets(st.integers(1, 40)))
def test_the_epoch_steps_tag_reads_back_every_epoch_and_stays_short(steps, dropped):
    from methodlab.tracking import epoch_steps_text, parse_epoch_steps

    steps = {e: s for e, s in steps.items() if e not in dropped}      # gaps: an epoch never logged
    text = epoch_steps_text(steps)
    assert parse_epoch_steps(text) == steps
    # a new "a-b:s+d" (or "a:s") only where an epoch is missing or the spacing changes
    e, s = list(steps), list(steps.values())
    breaks = sum(1 for i in range(1, len(e)) if e[i] != e[i - 1] + 1 or (
        i >= 2 and e[i - 1] == e[i - 2] + 1 and s[i] - s[i - 1] != s[i - 1] - s[i - 2]))
    assert len(text.split()) <= 1 + breaks if steps else text == ""
    assert epoch_steps_text({e: 47 * e for e in range(1, 1001)}) == "1-1000:47+47"


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.integers(1, 10**6), min_size=0, max_size=3000), chunk=st.sampled_from([40, 4000]))
def test_the_epoch_steps_tags_hold_any_run_within_mlflows_tag_limit(gaps, chunk):
    """Steps per epoch that vary every epoch (Bad Batches drops batches) make one entry per
    epoch: the tags continue in `.2`, `.3`, ..., each within its chunk (so within MLflow's
    8000), and read back every epoch."""
    from methodlab import tracking

    steps = dict(zip(range(1, len(gaps) + 1), itertools.accumulate(gaps)))
    tags = tracking.epoch_steps_tags(steps, chunk)
    assert tracking.epoch_steps_from_tags({**tags, "other": "x"}) == steps
    assert all(len(v) <= chunk for v in tags.values()) and max(map(len, tags.values())) <= 8000
    assert list(tags)[0] == tracking.EPOCH_STEPS_TAG and all(
        k == f"{tracking.EPOCH_STEPS_TAG}.{i}" for i, k in enumerate(list(tags)[1:], start=2))
    # a new epoch rewrites at most the last two tags
    if steps:
        more = tracking.epoch_steps_tags({**steps, len(steps) + 1: max(steps.values()) + 7}, chunk)
        assert sum(tags.get(k) != v for k, v in more.items()) <= 2


def test_a_long_run_with_varying_steps_per_epoch_keeps_flushing(tmp_path, monkeypatch):
    """Epochs of varying length on a real store, flushed by three attempts: the map passes one
    tag (a 300-character chunk here, 4000 in use: 120 epochs stand for ~800), and every epoch is
    still logged once at its step and read back."""
    from methodlab import tracking

    monkeypatch.setattr(tracking, "EPOCH_STEPS_CHUNK", 300)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "long")
    run_id = tracker.start_run("r", {}, {}, "")
    steps = dict(zip(range(1, 121), itertools.accumulate(100 + (e * 7919) % 13 for e in range(120))))
    for first in range(1, 121, 40):         # three attempts' flushes
        _spooled(tracker, run_id, tmp_path, [({"loss": 1.0 / e}, steps[e], e) for e in range(first, first + 40)])
    tags = tracker.client.get_run(run_id).data.tags
    assert len([k for k in tags if k.startswith(tracking.EPOCH_STEPS_TAG)]) >= 4
    assert tracker.logged_epochs(run_id) == steps
    assert epochs_logged(tracker.client, run_id, "loss") == list(range(1, 121))


def _spooled(tracker, run_id, spool_dir, lines):
    from methodlab.tracking import MetricSpool

    spool = MetricSpool(tracker, run_id, spool_dir)
    for metrics, step, epoch in lines:
        spool.append(metrics, step, epoch)
    assert spool.flush()


def test_each_epoch_is_logged_once_at_its_global_step_and_the_axis_never_goes_back(tmp_path):
    """The rule of `flush_spool_file`, on a real store: epochs at the global step at their end;
    a resume from an older checkpoint re-runs epochs MLflow has (not logged again); a resume on
    more workers re-runs them in fewer steps, and the next epochs go one step past the last."""
    from methodlab.tracking import EPOCH_STEPS_TAG

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "axis")
    run_id = tracker.start_run("r", {}, {}, "")
    # 2 workers, 20 steps an epoch: epochs 1-4 (a stage of 2, then another stage)
    _spooled(tracker, run_id, tmp_path, [({"pretune/loss": 1.0}, 20, 1), ({"pretune/loss": 0.9}, 40, 2),
                                         ({"loss": 0.8}, 60, 3), ({"loss": 0.7}, 80, 4)])
    # resumed from epoch 2's checkpoint on 4 workers (10 steps an epoch): 3 and 4 again, then 5, 6, 7
    _spooled(tracker, run_id, tmp_path, [({"pretune/loss": 0.9}, 40, 2), ({"loss": 0.5}, 50, 3), ({"loss": 0.5}, 60, 4),
                                         ({"loss": 0.6}, 70, 5), ({"loss": 0.5}, 80, 6), ({"loss": 0.4}, 90, 7)])
    history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, "loss"))
    assert history == [(60, 0.8), (80, 0.7), (81, 0.6), (82, 0.5), (90, 0.4)]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "pretune/loss")] == [20, 40]
    assert tracker.logged_epochs(run_id) == {1: 20, 2: 40, 3: 60, 4: 80, 5: 81, 6: 82, 7: 90}
    assert tracker.client.get_run(run_id).data.tags[EPOCH_STEPS_TAG] == "1-4:20+20 5-6:81+1 7:90"
    assert not {"epoch", "step"} & set(tracker.run_metrics(run_id))


def test_a_run_logged_before_the_step_axis_resumes_without_duplicates(tmp_path):
    """A run whose epochs were logged at step = epoch index with an `epoch` metric, and a spool
    line of that time (no epoch of its own): each epoch still once."""
    import json

    from methodlab.tracking import flush_spool_file

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "legacy")
    run_id = tracker.start_run("r", {}, {}, "")
    for epoch in (1, 2):
        tracker.log_metrics(run_id, {"epoch": float(epoch), "loss": 1.0 / epoch}, epoch - 1)
    assert tracker.logged_epochs(run_id) == {1: 0, 2: 1}
    path = tmp_path / f"{run_id}.jsonl"
    old = {"uri": tracker.uri, "run_id": run_id, "metrics": {"epoch": 2.0, "loss": 0.5}, "step": 1}
    path.write_text(json.dumps(old) + "\n" + json.dumps({**old, "metrics": {"loss": 0.25}, "step": 30, "epoch": 3}) + "\n")
    assert flush_spool_file(tracker, path)
    assert sorted(m.step for m in tracker.client.get_metric_history(run_id, "loss")) == [0, 1, 30]


@contextlib.contextmanager
def _cut_between_metrics_and_tags():
    """MLflow's `log_batch` commits the metrics, then the tags, in two transactions: a writer
    stopped between them (its worker killed, its server gone) leaves just the metrics. Here the
    tags' transaction fails, as it would have never run."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with mock.patch.object(SqlAlchemyStore, "_set_tags", side_effect=MlflowException("writer stopped")):
        yield


def test_an_epoch_whose_write_was_cut_after_its_metrics_is_not_logged_twice(tmp_path):
    """CI saw an epoch twice on a resumed run's chart: the failed attempt's last flush had
    committed the epoch's metrics, not its tag entry. Its retry in the same process, and a resume
    that re-runs the epoch in fewer steps, both count it as logged, at the step it has."""
    from methodlab.tracking import MetricSpool

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "cut")
    run_id = tracker.start_run("r", {}, {}, "")
    spool = MetricSpool(tracker, run_id, tmp_path)
    assert spool.log({"loss": 1.0}, 20, 1)
    with _cut_between_metrics_and_tags():
        assert not spool.log({"loss": 0.5}, 40, 2)           # metrics in, tag entry not
    assert tracker.logged_epochs(run_id) == {1: 20}
    assert spool.flush()                                     # the same process retries
    assert tracker.logged_epochs(run_id) == {1: 20, 2: 40}
    with _cut_between_metrics_and_tags():
        assert not spool.log({"loss": 0.25}, 60, 3)
    # the worker dies; a resume from epoch 2's checkpoint on twice the workers re-runs epoch 3
    _spooled(tracker, run_id, tmp_path, [({"loss": 0.2}, 50, 3), ({"loss": 0.1}, 60, 4)])
    assert tracker.logged_epochs(run_id) == {1: 20, 2: 40, 3: 60, 4: 61}
    assert epochs_logged(tracker.client, run_id, "loss") == [1, 2, 3, 4]
    assert [m.value for m in sorted(tracker.client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] \
        == [1.0, 0.5, 0.25, 0.1]


ATTEMPTS = st.lists(st.tuples(st.integers(0, 4), st.integers(1, 4), st.integers(1, 30), st.booleans()),
                    min_size=1, max_size=4)


@functools.cache
def _one_store(root: str) -> Tracker:
    return Tracker(f"sqlite:///{root}/axis.db", "axis")        # (a fresh store per example is slow)


@settings(max_examples=25, deadline=None)
@given(attempts=ATTEMPTS)
def test_any_sequence_of_resumes_logs_each_epoch_once_on_an_axis_that_never_goes_back(attempts, tmp_path_factory):
    """Attempts that each resume `back` epochs before the last one spooled (a checkpoint that old)
    and run `n` epochs of `per_epoch` steps, some (`cut`) stopped while writing their last
    epoch, between its metrics and its tags: in MLflow every epoch once, in order, each at its
    global step or (only where that is not past the step before it) one past that."""
    from methodlab.tracking import EPOCH_STEPS_TAG, MetricSpool, parse_epoch_steps

    tmp = tmp_path_factory.mktemp("axis")
    tracker = _one_store(str(tmp_path_factory.getbasetemp()))
    run_id = tracker.start_run("r", {}, {}, "")
    lines, epoch, step = [], 0, 0
    for back, n, per_epoch, cut in attempts:
        epoch, step = max(0, epoch - back), max(0, step - back * per_epoch)   # the checkpoint resumed from
        for _ in range(n):
            epoch, step = epoch + 1, step + per_epoch
            lines.append(({"loss": float(epoch)}, step, epoch))
        spool = MetricSpool(tracker, run_id, tmp)         # a new process per attempt
        for i, line in enumerate(lines[-n:]):
            if cut and i == n - 1:
                with _cut_between_metrics_and_tags():
                    spool.log(*line)
            else:
                spool.log(*line)
    assert MetricSpool(tracker, run_id, tmp).flush()      # (`methodlab sync`, after a last cut)
    logged = tracker.logged_epochs(run_id)
    assert list(logged) == list(range(1, max(e for *_, e in lines) + 1))
    assert all(a < b for a, b in zip(list(logged.values()), list(logged.values())[1:]))
    first = {}
    for _, s, e in lines:
        if e > max(first, default=0):
            first[e] = s          # the line each epoch is logged from: the first past the last
    for e, s in logged.items():
        assert s == first[e] or (s > first[e] and s == logged.get(e - 1, -1) + 1)
    history = tracker.client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(e)) for e, s in logged.items()]
    assert parse_epoch_steps(tracker.client.get_run(run_id).data.tags[EPOCH_STEPS_TAG]) == logged


def test_a_stopped_sweep_finds_the_trials_its_stop_interrupted_and_no_other(tmp_path):
    """`stopped_children` after a stop at t: RUNNING, KILLED (by its own trial), FAILED after t
    (its Ray Train controller torn down under it as Tune stopped its actor: CI saw one) are
    the stop's; FAILED before t (a real failure) and FINISHED are not."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "stop")
    parent = tracker.start_run("sweep", {}, {}, "")
    t = 1_800_000_000_000
    ended = {"running": None, "killed": ("KILLED", t + 5), "failed-by-stop": ("FAILED", t + 10),
             "failed-before": ("FAILED", t - 10), "finished": ("FINISHED", t + 10)}
    ids = {}
    for name, end in ended.items():
        ids[name] = tracker.start_run(name, {}, {}, "", parent_run_id=parent)
        if end:
            tracker.client.set_terminated(ids[name], status=end[0], end_time=end[1])
    tracker.start_run("another sweep's", {}, {}, "")
    found = sorted(tracker.stopped_children(parent, t))
    assert found == sorted([(ids["running"], "running", "RUNNING"), (ids["killed"], "killed", "KILLED"),
                            (ids["failed-by-stop"], "failed-by-stop", "FAILED")])
