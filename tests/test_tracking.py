"""Params flattening and redaction, the registry's promote rule (against a real SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from methodlab.tracking import MAX_PARAM_KEY, MAX_PARAM_VALUE, REDACTED, Tracker, flatten_params

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
