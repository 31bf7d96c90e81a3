"""Ray Tune sweeps of any registered method: each trial is a full Ray Train run, and the whole
sweep is one MLflow parent run with a child run per trial.

    methodlab sweep supervised -c jobs/sweeps/supervised.yaml search.num_samples=8 train.epochs=10

A sweep file (jobs/sweeps/<name>.yaml) has four parts, all optional:

    method_name: supervised        # the method it is written for (checked against the command)
    name: supervised-lr            # Tune storage under storage.path/<name>; resubmitting resumes
    base:                          # the run config of every trial (method:, data:, train:, scaling:, ...)
      train: {epochs: 10}
      scaling: {num_workers: 2, cpus_per_worker: 0.49}   # the resources of one trial
    space:                         # dotted config keys -> distributions, over the method's default
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.weight_decay: null     # null drops a key of the default space
    search:
      algorithm: random            # random | grid | optuna (TPE)
      num_samples: 8
      max_concurrent_trials: 2     # default: as many as the cluster fits
      scheduler: {type: asha, grace_period: 2, reduction_factor: 2}

`key=value` overrides go to the sweep where the key starts with `name`, `space.` or `search.`
(`space.train.lr={choice: [1e-3, 1e-2]}`), and to `base` otherwise (`train.epochs=3`).

Why it is built this way:
- The space is validated before Ray starts: every key must be a config key, every bound and
  every option must be a valid value of that key, so a typo costs no cluster time.
- A trial is the pattern Ray 2.x recommends for Train inside Tune: a Tune function (0.01 CPU, so
  it does not take a worker's CPU) that builds the run's TorchTrainer with a TuneReportCallback
  and fits it. The trial's Ray Train run and its MLflow child run are named after the sweep and
  the Tune trial id, so a restored trial continues both instead of starting over.
- ASHA stops a trial by killing its actor, so nothing in the trial can record that. The driver
  does it afterwards: a trial whose child run is still RUNNING after Tune terminated it was
  stopped early; it is tagged `methodlab.stopped_early=true` and ended KILLED.
- SIGINT or SIGTERM to the driver asks Tune to end the experiment (`_stop_tune`): it saves its
  state and stops every trial, whose child runs the driver then ends KILLED, with the parent, and
  says in one line how to resume; a second signal exits at once (`train.signals`).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

import methodlab.methods  # noqa: F401  (fills the registries in each Tune trial's process too)
from methodlab import storage
from methodlab.config import (RunConfig, Section, check_name, deep_merge, nest, parse_override, read_yaml,
                              resolve, run_config_class, set_path, yaml_number)
from methodlab.console import short as _short
from methodlab.errors import ConfigError, TrainingError
from methodlab.registry import get_method
from methodlab.train.core import FINAL_STAGE_EPOCH
from methodlab.train.lease import Lease, drop as drop_lease
from methodlab.train.signals import Interrupted, stop_on_signals

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
TRIAL_CPU = 0.01          # the Tune function only waits on its TorchTrainer; 0 is rejected by Tune
SWEEP_KEYS = ("name", "space", "search", "method_name", "base")


# ----------------------------------------------------------------------------------------------
# The sweep file


class SchedulerConfig(Section):
    type: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials at rungs; fifo: run all")
    # ASHA counts the epochs of a method's final stage, the one its metric is measured in (MMANet's
    # student, TOAST's transfer, D3GZSL's GAN): a teacher or pretune stage before it is not counted.
    grace_period: int = Field(1, gt=0, description="epochs of the final stage (where the metric is measured) "
                              "every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1/reduction_factor at each rung")
    max_t: int | None = Field(None, gt=0, description="epochs of the final stage after which ASHA stops any "
                              "trial; default: past the final stage's epochs, so trials run to their end")


class SearchConfig(Section):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: sample the space; grid: every `choice` becomes a grid (ranges "
        "are refused); optuna: TPE through Tune's OptunaSearch")
    num_samples: int = Field(8, gt=0, description="trials (with grids: repeats of the whole grid)")
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: as many as the cluster fits")
    seed: int = Field(0, ge=0, description="seed of the sampler, so a sweep can be repeated")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)


class SweepSpec(Section):
    method_name: str | None = None
    name: str | None = Field(None, description="default: <method>-sweep-<hash of the sweep>")
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        return check_name(v, 80)


def _spec_error(e: ValidationError, origin: str, set_by: dict[str, str]) -> ConfigError:
    err = e.errors()[0]
    dotted = ".".join(str(p) for p in err["loc"])
    # The override that set this key (or a key above it), else the file.
    origin = next((set_by[k] for k in sorted(set_by, key=len, reverse=True)
                   if dotted == k or dotted.startswith(k + ".")), origin)
    if err["type"] == "extra_forbidden":
        return ConfigError(f"unknown sweep key {dotted} ({origin}); the sweep keys are "
                           f"{', '.join(SWEEP_KEYS)}, and run config sections go under base:")
    return ConfigError(f"sweep {dotted}: {err['msg']} (got {err.get('input')!r}, {origin})")


def load_spec(method_name: str, yaml_path: str | None, overrides: list[str] = ()) -> tuple[SweepSpec, list[tuple[str, dict]]]:
    """The sweep spec and the `base` config layers (file, then overrides), validated."""
    data = read_yaml(yaml_path) if yaml_path else {}
    origin = f"in {yaml_path}" if yaml_path else "by default"
    base_layers: list[tuple[str, dict]] = [(f"in {yaml_path} (base:)", data.get("base") or {})]
    sweep_over: dict = {}
    set_by: dict[str, str] = {}       # dotted sweep key -> the override that set it
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "space" and len(path) > 1:
            sweep_over.setdefault("space", {})[".".join(path[1:])] = value
        elif path[0] in ("name", "search", "method_name"):
            set_path(sweep_over, path, value, f"override {text!r}")
            set_by[".".join(path)] = f"set by override {text!r}"
        else:
            tree: dict = {}
            set_path(tree, path[1:] if path[0] == "base" else path, value, f"override {text!r}")
            base_layers.append((f"by override {text!r}", tree))
    merged = deep_merge(data, sweep_over)
    try:
        spec = SweepSpec.model_validate(merged)
    except ValidationError as e:
        raise _spec_error(e, origin, set_by) from None
    if spec.method_name and spec.method_name != method_name:
        raise ConfigError(f"sweep file {yaml_path} is for method {spec.method_name!r}, not {method_name!r}; "
                          f"run `methodlab sweep {spec.method_name} -c {yaml_path}`")
    return spec, base_layers


# ----------------------------------------------------------------------------------------------
# Search spaces: validated before any trial starts


def _config_keys(cls: type[BaseModel], cfg: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a run config: the leaves of its sections (and of dict-valued fields)."""
    out = []
    for name, f in cls.model_fields.items():
        ann = f.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _config_keys(ann, cfg.get(name) or {}, dotted + ".")
        else:
            out.append(dotted)
            if isinstance(cfg.get(name), dict):
                out += [f"{dotted}.{k}" for k in cfg[name]]
    return out


def _check_key(key: str, cls: type[BaseModel], base: dict, valid: list[str]) -> None:
    if key in valid:
        return
    # Below a dict-valued field (method.arch_kwargs.width) any key is allowed: the method checks it.
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in valid and _is_dict_field(cls, parts[:i]):
            return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "keys are dotted config keys such as train.lr"
    raise ConfigError(f"space key {key}: unknown config key; {hint}")


def _is_dict_field(cls: type[BaseModel], parts: list[str]) -> bool:
    model: Any = cls
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    ann = model.model_fields[parts[-1]].annotation
    return getattr(ann, "__origin__", ann) is dict


def _dist(key: str, spec: Any) -> tuple[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"space key {key}: a distribution is one of "
                          f"{', '.join('{' + d + ': ...}' for d in DISTRIBUTIONS)}, got {spec!r}")
    (kind, args), = spec.items()
    if isinstance(args, list):
        args = [yaml_number(a) for a in args]
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(DISTRIBUTIONS)}"
        raise ConfigError(f"space key {key}: unknown distribution {kind!r}; {hint}")
    if kind in ("uniform", "loguniform"):
        ok = (isinstance(args, list) and len(args) == 2
              and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args))
        if not ok:
            raise ConfigError(f"space key {key}: {kind} takes [low, high] as two finite numbers, got {args!r}")
        lo, hi = args
        if lo > hi:
            raise ConfigError(f"space key {key}: {kind} low {lo} > high {hi}; swap them")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"space key {key}: loguniform needs low > 0, got {lo}")
    elif not isinstance(args, list) or not args:
        raise ConfigError(f"space key {key}: {kind} takes a non-empty list of values, got {args!r}")
    return kind, args


def validate_space(method_name: str, space: dict[str, dict], base_layers: list[tuple[str, dict]],
                   algorithm: str) -> dict[str, tuple[str, list]]:
    """{key: (distribution, args)}; raises a one-line ConfigError that names the key. Every bound
    and option is also checked as a config value, so e.g. `train.lr: {uniform: [0, 1]}` fails here
    (lr must be > 0) rather than in the trial that happens to draw 0."""
    if not space:
        raise ConfigError(f"method {method_name} has no default search space; give one under space:")
    method = get_method(method_name)
    cls = run_config_class(method.Config)
    base = resolve(method_name, base_layers).model_dump(mode="json")
    valid = _config_keys(cls, base)
    out: dict[str, tuple[str, list]] = {}
    for key, spec in space.items():
        _check_key(key, cls, base, valid)
        kind, args = _dist(key, spec)
        if algorithm == "grid" and kind in ("uniform", "loguniform"):
            raise ConfigError(f"space key {key}: search.algorithm=grid needs finite values, not a {kind} "
                              "range; use {choice: [...]} or search.algorithm=random")
        if algorithm == "optuna" and kind == "grid":
            raise ConfigError(f"space key {key}: search.algorithm=optuna cannot sample a grid; "
                              "use {choice: [...]}")
        for value in args:
            try:
                resolve(method_name, [*base_layers, (f"by space key {key}", nest(key.split("."), value))])
            except ConfigError as e:
                raise ConfigError(f"space key {key}: value {value!r} is not valid there ({e})") from None
        out[key] = (kind, list(args))
    return out


def tune_space(space: dict[str, tuple[str, list]], algorithm: str) -> dict:
    from ray import tune

    def domain(kind: str, args: list):
        if kind == "grid" or (kind == "choice" and algorithm == "grid"):
            return tune.grid_search(args)
        if kind == "choice":
            return tune.choice(args)
        return (tune.loguniform if kind == "loguniform" else tune.uniform)(*args)
    return {key: domain(kind, args) for key, (kind, args) in space.items()}


def merged_space(method_name: str, spec: SweepSpec) -> dict[str, dict]:
    """The method's default space with the file's keys over it; a null value drops a key."""
    space = {**get_method(method_name).search_space, **spec.space}
    return {k: v for k, v in space.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# One trial: a Tune function that runs one Ray Train run


def trial_config(ctx: dict, params: dict[str, Any], run_name: str) -> RunConfig:
    layers = [*ctx["base_layers"], *((f"by trial param {k}", nest(k.split("."), v)) for k, v in params.items()),
              ("for this trial", {"train": {"run_name": run_name}, "tracking": {"register_model": False}})]
    return resolve(ctx["method_name"], layers)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The trial's run name: its Tune trial id first, so the part that tells the children apart
    survives where MLflow's runs table cuts long names short (the sweep's name is the parent's,
    which the table shows above them). A resumed sweep's trials keep their ids, so each finds its
    child run again (`Tracker.find_run`)."""
    return f"{trial_id}-{sweep_name}"


def run_trial(params: dict, ctx: dict) -> None:
    """The Tune function of one trial (runs in a Tune actor, on 0.01 CPU)."""
    from ray import tune

    from methodlab.train.launch import dataset_for, run_dir

    name = trial_run_name(ctx["sweep_name"], tune.get_context().get_trial_id())
    cfg = trial_config(ctx, params, name)
    storage.configure(cfg.storage)
    with Lease(run_dir(cfg), "trial", name, cfg.train.lease_timeout_s):
        _trial_leased(cfg, params, ctx, dataset_for(cfg))


def _trial_leased(cfg: RunConfig, params: dict, ctx: dict, info) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from methodlab.tracking import STOPPED_TAG, SWEEP_NAME_TAG, TRIAL_PARAM_TAG, Tracker
    from methodlab.train.launch import finish, fit, start_or_resume

    name = cfg.run_name
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    existing = tracker.find_run(name)
    if existing is not None and existing.status == "FINISHED":
        # Finished before the sweep driver died: tell Tune its result instead of training again.
        tune.report(existing.metrics)
        return
    run_id = start_or_resume(tracker, cfg, info, existing, parent_run_id=ctx["parent_run_id"],
                             tags={SWEEP_NAME_TAG: ctx["sweep_name"],
                                   **{f"{TRIAL_PARAM_TAG}{k}": v for k, v in params.items()}})
    # A failure marks the child run FAILED and raises; Tune records the error.
    fit(tracker, cfg, info, run_id, what="trial", callbacks=[TuneReportCallback()])
    finish(tracker, run_id, {STOPPED_TAG: "false"})


# ----------------------------------------------------------------------------------------------
# The driver


@dataclass
class Trial:
    trial_id: str
    run_name: str
    run_id: str | None
    params: dict[str, Any]
    metric: float | None
    epochs: int
    status: str                # FINISHED | KILLED (stopped early) | FAILED
    error: str = ""

    @property
    def stopped_early(self) -> bool:
        return self.status == "KILLED"


@dataclass
class SweepSummary:
    name: str
    method: str
    metric: str
    mode: str
    parent_run_id: str
    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    registered_model: str | None = None
    version: str | None = None
    restored: bool = False
    already_finished: bool = False

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    def line(self) -> str:
        if self.already_finished:
            return f"sweep {self.name}: already finished (MLflow run {self.parent_run_id}); nothing to do"
        stopped = sum(t.stopped_early for t in self.trials)
        failed = sum(t.status == "FAILED" for t in self.trials)
        head = (f"sweep {self.name}{' (resumed)' if self.restored else ''}: {len(self.trials)} trials "
                f"({stopped} stopped early, {failed} failed, {self.trial_epochs} trial-epochs)")
        if self.best is None:
            return f"{head} · no trial reported {self.metric} · MLflow run {self.parent_run_id}"
        best = ", ".join(f"{k}={_short(v)}" for k, v in self.best.params.items())
        model = (f" · registered {self.registered_model} v{self.version} (alias candidate)"
                 if self.version else "")
        return (f"{head} · best {self.metric}={self.best.metric:.4f} ({self.best.run_name}: {best})"
                f"{model} · MLflow run {self.parent_run_id}")


def default_sweep_name(method_name: str, spec: SweepSpec, base: RunConfig) -> str:
    d = spec.model_dump(mode="json", exclude={"name", "base"})
    d["base"] = base.fingerprint()
    return f"{method_name}-sweep-{hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]}"


BASE_PARAM_SECTIONS = ("train", "scaling", "data")      # of the base config, logged on the parent run


def _space_params(space: dict) -> dict[str, str]:
    return {f"space.{k}": json.dumps({kind: args}) for k, (kind, args) in space.items()}


def _sweep_identity(space: dict, spec: SweepSpec, base: RunConfig) -> dict[str, str]:
    """The parent run's params that decide what a sweep trains: its space, its search settings
    (but the concurrency, which only changes how fast) and the base config's identity."""
    from methodlab.tracking import flatten_params

    search = flatten_params(spec.search.model_dump(mode="json"), "search.")
    search.pop("search.max_concurrent_trials")
    return {**_space_params(space), **search,
            **{f"base.{k}": v for k, v in flatten_params(base.compared_identity()).items()
               if k.split(".")[0] in BASE_PARAM_SECTIONS}}


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial holds while it runs: its Tune actor's CPU, its workers' CPUs (and Ray
    Data's, `launch.run_cpus`) and, with scaling.use_gpu, its workers' GPUs."""
    from methodlab.train.launch import run_cpus

    need = {"CPU": run_cpus(cfg) + TRIAL_CPU}
    if cfg.scaling.use_gpu:
        need["GPU"] = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    return need


def trials_that_fit(total: dict[str, float], need: dict[str, float]) -> int:
    """How many trials of `need` the cluster's `total` resources hold at once (at least 1, so a
    sweep of trials bigger than the cluster is refused by the capacity check, not here)."""
    return max(1, min(int((total.get(k, 0.0) + 1e-9) // v) for k, v in need.items() if v > 0))


def _concurrency(spec: SweepSpec, cfg: RunConfig) -> int:
    """Concurrent trials that fit, counting CPUs and GPUs: Ray Train worker groups that cannot be
    placed would wait on each other, so more than fit is refused before the sweep starts."""
    import ray

    total = ray.cluster_resources()  # [ray]
    need = trial_resources(cfg)
    fit = trials_that_fit(total, need)
    asked = spec.search.max_concurrent_trials
    if asked is not None and asked > fit:
        short = ", ".join(f"{asked * v:g} {k}s ({v:g} per trial) but the cluster has {total.get(k, 0):g}"
                          for k, v in need.items() if asked * v > total.get(k, 0) + 1e-9)
        raise ConfigError(f"search.max_concurrent_trials={asked} needs {short}; lower it or the per-trial "
                          "scaling (scaling.num_workers, cpus_per_worker, gpus_per_worker)")
    return asked or fit


def run_sweep(method_name: str, yaml_path: str | None = None, overrides: list[str] = ()) -> SweepSummary:
    """Run (or resume) a sweep of `method_name` and return its summary."""
    from methodlab.train.launch import preflight

    method = get_method(method_name)
    spec, base_layers = load_spec(method_name, yaml_path, list(overrides))
    base_layers = [(f"by {method_name}'s defaults", method.defaults), *base_layers]
    base = resolve(method_name, base_layers)
    space = validate_space(method_name, merged_space(method_name, spec), base_layers, spec.search.algorithm)
    name = spec.name or default_sweep_name(method_name, spec, base)
    # Resolved paths (storage, tracking), so the trials write where the driver reads.
    base_layers = [("as resolved for the sweep", base.model_dump(mode="json", exclude={"method_name"}))]

    info = preflight(base)
    # As for runs (`launch.train`): one submission of a sweep name at a time; each trial holds
    # its own run's lease too (`run_trial`).
    with Lease(f"{base.storage.path.rstrip('/')}/{name}", "sweep", name, base.train.lease_timeout_s):
        return _sweep_leased(method_name, method, spec, base, base_layers, space, name, info)


def _sweep_leased(method_name: str, method, spec: SweepSpec, base: RunConfig, base_layers: list, space: dict,
                  name: str, info) -> SweepSummary:
    from methodlab.tracking import (METHOD_TAG, METRIC_TAG, MODE_TAG, SCHEDULER_TAG, SWEEP_TAG, Tracker,
                                    differing_params, flatten_params)
    from methodlab.train.launch import check_capacity, check_shared_services, ensure_ray

    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    existing = tracker.find_run(name)
    if existing is not None and existing.status == "FINISHED":
        # As for runs: an explicit name met again with another space, search or base config is
        # refused rather than answered with the old sweep (the derived name hashes all of them).
        changed = sorted(differing_params(_sweep_identity(space, spec, base), existing.params))
        if changed:
            raise ConfigError(f"sweep {name} already finished with other values of {', '.join(changed)}; "
                              "set a new name, or leave it unset (the derived name follows the sweep)")
        return SweepSummary(name, method_name, method.metric, method.mode, existing.run_id, already_finished=True)

    for k, v in {"RAY_AIR_NEW_OUTPUT": "0",                  # Tune's CLIReporter, not the new output
                 "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # early stages may not report the metric
                 "TUNE_GLOBAL_CHECKPOINT_S": "2"}.items():    # the experiment state a resume starts from
        os.environ.setdefault(k, v)
    # [ray] Tune's SIGINT handler would take the first Ctrl-C without a word to the driver (and
    # SIGTERM would kill it on the spot): `stop_on_signals` takes both and asks Tune (`_stop_tune`).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    ensure_ray()
    check_shared_services(base, info)
    check_capacity(base)
    concurrent = _concurrency(spec, base)

    sched = spec.search.scheduler
    if existing is not None:
        parent = existing.run_id
        tracker.resume_run(parent)
    else:
        params = {**_space_params(space),
                  **flatten_params(spec.search.model_dump(mode="json"), "search."),
                  "search.max_concurrent_trials": str(concurrent),
                  **{f"base.{k}": v for k, v in flatten_params(base.recorded()).items()
                     if k.split(".")[0] in BASE_PARAM_SECTIONS}}
        parent = tracker.start_run(name, params, {SWEEP_TAG: "true", METHOD_TAG: method_name,
                                                  METRIC_TAG: method.metric, MODE_TAG: method.mode,
                                                  SCHEDULER_TAG: sched.type},
                                   _spec_yaml(spec, space, base, concurrent))
    ctx = {"method_name": method_name, "base_layers": base_layers, "sweep_name": name, "parent_run_id": parent}
    fired: list[int] = []
    signalled_ms: list[int] = []

    def stop(signum: int) -> bool:
        signalled_ms.append(int(time.time() * 1000))
        return _stop_tune(signum)

    try:
        with stop_on_signals(stop) as fired:
            results, restored = _fit(name, base, spec, space, ctx, concurrent, method)
    except KeyboardInterrupt:      # a signal before Tune's loop began: no trial trains yet
        raise _interrupted(tracker, base, name, parent, fired[0] if fired else signal.SIGINT,
                           signalled_ms[0] if signalled_ms else int(time.time() * 1000)) from None
    except Exception as exc:   # noqa: BLE001 — Tune itself failed: the parent is FAILED, one line
        tracker.end_run(parent, "FAILED")
        raise TrainingError(f"sweep {name} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__} "
                            f"(MLflow run {parent})") from None
    if fired:                      # Tune saved its state and stopped every trial
        raise _interrupted(tracker, base, name, parent, fired[0], signalled_ms[0])
    if results.num_terminated + results.num_errors < len(results):
        raise TrainingError(f"sweep {name} was interrupted before all trials ended; submit it again "
                            f"with the same name to resume (MLflow run {parent})")

    summary = SweepSummary(name, method_name, method.metric, method.mode, parent, restored=restored)
    summary.trials = _collect(results, tracker, name, space, method.metric)
    ranked = sorted((t for t in summary.trials if t.metric is not None and t.run_id),
                    key=lambda t: t.metric, reverse=method.mode == "max")
    summary.best, summary.version = _register_best(ranked, base, info, method, tracker, name)
    summary.registered_model = base.tracking.registered_model if summary.version else None
    _finish_children(summary.trials, tracker)
    _log_summary(summary, space, tracker)
    tracker.end_run(parent, "FINISHED")
    return summary


def _stop_tune(signum: int) -> bool:
    """Ask Tune to end the experiment, as its own Ctrl-C does: the handler `tune.run` installs on
    SIGUSR1 [ray] (whatever TUNE_DISABLE_SIGINT_HANDLER says) sets the event its loop checks, then
    Tune saves the experiment state (trials still running are saved unfinished, so a resubmission
    continues them) and stops every trial (the trial actor and, owned by it, its Ray Train
    controller and workers). False before `tune.run` has installed it: nothing runs yet."""
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler):
        return False
    handler(signal.SIGUSR1, None)
    return True


def _interrupted(tracker, base: RunConfig, name: str, parent: str, signum: int, since_ms: int) -> Interrupted:
    """After Tune stopped on a signal at `since_ms`: each trial's child run that was still running
    (its actor is gone, so nothing in it could) and the parent end KILLED, the trial's lease is dropped (the
    driver holds the sweep's, so no one else holds its trials'); the line to show names the sweep,
    where the trials' checkpoints stay, and the command that resumes it."""
    from methodlab.train.launch import _end_quietly, resume_command

    killed = []
    try:
        # (a trial's own run may be KILLED already: its trial can end it as Tune stops the actor)
        killed = tracker.stopped_children(parent, since_ms)
    except Exception:  # noqa: BLE001 — tracking server away: the line below still comes
        print(f"[methodlab] could not list the running trials of MLflow run {parent}: tracking server "
              "unreachable", flush=True)
    for run_id, run_name, status in killed:
        if status != "KILLED":
            _end_quietly(tracker, run_id, "KILLED")
        drop_lease(f"{base.storage.path.rstrip('/')}/{run_name}")
    _settle_stopped(tracker, parent, since_ms)
    _end_quietly(tracker, parent, "KILLED")
    names = ", ".join(sorted(n for _, n, _ in killed))
    trials = (f"{len(killed)} running trial(s) stopped and marked KILLED ({names}), each keeping its last "
              f"checkpoint under {base.storage.path.rstrip('/')}/<trial run name>" if killed else "no trial was running")
    return Interrupted(signum, f"sweep {name} interrupted by {Interrupted.name(signum)}: {trials}; MLflow run "
                       f"{parent} KILLED; resume with: {resume_command(f'name={name}')}")


SETTLE_S = 3.0      # how long the driver watches its stopped trials' runs after marking them


def _settle_stopped(tracker, parent: str, since_ms: int, settle_s: float = SETTLE_S) -> None:
    """Tune's fit can return while a stopped trial's process still runs its failure path: it
    ends its run only if it is still RUNNING (`Tracker.end_run_if_running`), but one that read
    RUNNING just before the driver marked it KILLED writes FAILED just after (CI saw it). Such a
    write comes within milliseconds of the read, so the driver watches for `settle_s` and marks
    KILLED again each run of this stop that ended FAILED after the signal."""
    from methodlab.train.launch import _end_quietly

    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        try:
            late = [run_id for run_id, _, status in tracker.stopped_children(parent, since_ms) if status == "FAILED"]
        except Exception:  # noqa: BLE001 — tracking server away: what was marked stays marked
            return
        for run_id in late:
            _end_quietly(tracker, run_id, "KILLED")


def _spec_yaml(spec: SweepSpec, space: dict, base: RunConfig, concurrent: int) -> str:
    import yaml

    d = spec.model_dump(mode="json", exclude={"base", "space"})
    d["search"]["max_concurrent_trials"] = concurrent
    d["space"] = {k: {kind: args} for k, (kind, args) in space.items()}
    d["base"] = base.model_dump(mode="json", exclude={"method_name"})
    return yaml.safe_dump(d, sort_keys=False)


def final_stage_epochs(cfg: RunConfig) -> int:
    """The epochs of the final stage of a run of `cfg`, the one its method's metric is measured in
    (`Method.epochs_by_stage`): what ASHA counts (`FINAL_STAGE_EPOCH`, reported in that stage
    only). ASHA's max_t must be above it, or ASHA would cut every trial short of its last epoch.
    Counting every stage instead (the run's `epoch`) would compare a method after its teacher or
    pretune stage with a baseline that has none after more epochs of the metric, and would put
    every rung that falls inside the earlier stages at the final stage's first epoch."""
    method = get_method(cfg.method_name)
    return method.epochs_by_stage(cfg)[method.stages[-1]]


def _fit(name: str, base: RunConfig, spec: SweepSpec, space: dict, ctx: dict, concurrent: int, method):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from methodlab.sweep_console import StatusLine, TrialEvents, asha_rungs
    from methodlab.train.launch import _storage_kwargs

    # [ray] Tune's TensorBoard logger (tensorboardX) warns "NaN or Inf found in input tensor." at
    # each result of a teacher or pretune stage: its checkpoints rank last by a score of -inf
    # (loop.SCORE_KEY), on purpose.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": TRIAL_CPU})
    param_space = tune_space(space, spec.search.algorithm)
    root = _storage_kwargs(base)
    path = f"{root['storage_path'].rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=root.get("storage_filesystem")):
        print(f"sweep {name}: restoring from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space, storage_filesystem=root.get("storage_filesystem"))
        return tuner.fit(), True

    s = spec.search
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=s.seed)
    else:
        # A generator ignores TuneConfig's max_concurrent_trials; it takes the limit itself.
        search_alg = BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent)
    sched = s.scheduler
    # ASHA stops a trial *at* max_t, before its run could finish.
    max_t = max(sched.max_t or final_stage_epochs(base) + 1, sched.grace_period)
    scheduler = (ASHAScheduler(time_attr=FINAL_STAGE_EPOCH, grace_period=sched.grace_period,
                               reduction_factor=sched.reduction_factor, max_t=max_t)
                 if sched.type == "asha" else FIFOScheduler())
    # A line per trial event and a status line at most every 30 s, not Tune's tables.
    events = TrialEvents(name, method.metric, method.mode,
                         asha_rungs(sched.grace_period, sched.reduction_factor, max_t) if sched.type == "asha" else [])
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=method.metric, mode=method.mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=concurrent if s.algorithm == "optuna" else None,
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, progress_reporter=StatusLine(events), callbacks=[events], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0), **root))
    return tuner.fit(), False


def _collect(results, tracker, name: str, space: dict, metric: str) -> list[Trial]:
    from methodlab.tracking import epoch_steps_from_tags

    out = []
    for r in results:
        trial_id = os.path.basename(r.path.rstrip("/"))
        run_name = trial_run_name(name, trial_id)
        rec = tracker.find_run(run_name)
        last = r.metrics or {}
        value = last.get(metric)
        if value is None and rec is not None:
            value = rec.metrics.get(metric)
        epochs = int(last.get("epoch") or (max(epoch_steps_from_tags(rec.tags), default=0)
                                           if rec else 0))
        if r.error is not None:
            status = "FAILED"
        elif rec is not None and rec.status == "FINISHED":
            status = "FINISHED"
        else:
            status = "KILLED"     # Tune terminated it without an error before it finished: ASHA
        params = {k: r.config.get(k) for k in space}
        out.append(Trial(trial_id, run_name, rec.run_id if rec else None, params,
                         float(value) if value is not None else None, epochs, status,
                         str(r.error).strip().splitlines()[-1] if r.error is not None and str(r.error).strip() else ""))
    return sorted(out, key=lambda t: t.trial_id)


def _register_best(ranked: list[Trial], base: RunConfig, info, method, tracker, name: str):
    """Register the best trial whose checkpoint holds the exported model (a multi-stage trial
    stopped before its last stage has none) from its last checkpoint, with alias `candidate`."""
    from methodlab.data.dataset import read_split
    from methodlab.models import hub
    from methodlab.models.serving import input_doc
    from methodlab.tracking import CHECKPOINT_ROOT_TAG

    if not ranked:
        return None, None
    # Raw rows, as stored: what the served model takes (it decodes them itself).
    example = read_split(info, "val", limit_rows=2)[method.export_input]
    doc = input_doc(info, method.export_input, base.data.normalize)
    for t in ranked:
        root = tracker.client.get_run(t.run_id).data.tags.get(CHECKPOINT_ROOT_TAG)
        try:
            model, spec = hub.load_pretrained(hub.latest_checkpoint(root))
        except ConfigError:
            continue
        version = tracker.register(t.run_id, model, spec, example, base.tracking.registered_model,
                                   {method.metric: t.metric, "sweep": name, "run_name": t.run_name,
                                    **{f"param.{k}": v for k, v in t.params.items()}}, doc)
        return t, version
    return ranked[0], None


def _finish_children(trials: list[Trial], tracker) -> None:
    """Every child run ends in the state Tune left its trial in (log_model re-opens a run, so this
    comes after registration)."""
    from methodlab.tracking import STOPPED_TAG, TRIAL_EPOCHS_TAG

    for t in trials:
        if t.run_id is None:
            continue
        tracker.set_tags(t.run_id, {STOPPED_TAG: str(t.stopped_early).lower(), TRIAL_EPOCHS_TAG: t.epochs})
        if tracker.client.get_run(t.run_id).info.status != t.status:   # keep a finished run's end time
            tracker.end_run(t.run_id, t.status)


def trials_csv(trials: list[Trial], space: dict, metric: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "run_name", "mlflow_run_id", "status", "stopped_early", "epochs", metric, *space])
    for t in trials:
        w.writerow([t.trial_id, t.run_name, t.run_id or "", t.status, str(t.stopped_early).lower(), t.epochs,
                    "" if t.metric is None else f"{t.metric:.6g}", *(t.params.get(k) for k in space)])
    return buf.getvalue()


def log_ticks(lo: float, hi: float, most: int = 5) -> list[float]:
    """Tick values for a log axis over a loguniform range [lo, hi] (0 < lo <= hi): the decades in it,
    or else the 1-2-5 (then 1..9) multiples of them, thinned to at most `most`; the bounds where
    even those give fewer than two; `lo` alone for a range within 0.1% (labels would need more
    digits than the panel has room for). Matplotlib's own locator labels the minor ticks of a range
    shorter than a few decades, and their labels ("2x10^-3 3x10^-3 ...") run into each other."""
    if hi <= lo * 1.001:
        return [lo]
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
        if len(ticks) >= 2:
            return ticks[::math.ceil(len(ticks) / most)]
    return [lo, hi]


def tick_labels(ticks: list[float]) -> list[str]:
    """Short labels, with as many significant digits (3 or more) as keep them apart: 0.05, 1, 250
    as they are; 2e-4 and 1.5e4 in the short exponent form."""
    def label(v: float, digits: int) -> str:
        if 0.01 <= abs(v) < 1000:
            return f"{v:.{digits}g}"
        mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    digits = next((d for d in range(3, 17) if len({label(v, d) for v in ticks}) == len(set(ticks))), 17)
    return [label(v, digits) for v in ticks]


def metric_plot(trials: list[Trial], space: dict, metric: str):
    """One panel per hyperparameter: the metric of every trial against its value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        kind, args = space[key]
        for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early")):
            pts = [(t.params.get(key), t.metric) for t in trials if t.metric is not None and t.stopped_early == stopped]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if kind in ("choice", "grid"):
                labels = [str(a) for a in args]
                xs = [labels.index(str(x)) for x in xs]
                ax.set_xticks(range(len(labels)), labels)
            ax.scatter(xs, ys, marker=marker, label=label)
        if kind == "loguniform":
            ax.set_xscale("log")
            lo, hi = args
            ticks = log_ticks(lo, hi)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.set_xticklabels(tick_labels(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            pad = (hi / lo) ** 0.05 if hi > lo else 1.5       # the whole range, 5% margins
            ax.set_xlim(lo / pad, hi * pad)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def parent_note(s: SweepSummary, tracker) -> str:
    """The parent run's description (markdown, MLflow's run note): the trials, and links to the best
    trial's run and to the model version registered from it."""
    failed = sum(t.status == "FAILED" for t in s.trials)
    lines = [f"Sweep `{s.name}` of {s.method}: {len(s.trials)} trials ({sum(t.stopped_early for t in s.trials)} "
             f"stopped early, {failed} failed), ranked by {s.metric} ({s.mode}).", ""]
    if s.best is None:
        return "\n".join([*lines, f"No trial reported {s.metric}."])
    params = ", ".join(f"{k}={_short(v)}" for k, v in s.best.params.items())
    lines.append(f"Best trial: [{s.best.run_name}]({tracker.run_url(s.best.run_id)}), "
                 f"{s.metric}={s.best.metric:.4f} ({params}).")
    lines.append("")
    if s.version:
        lines.append(f"Registered model: [{s.registered_model} version {s.version}]"
                     f"({tracker.model_version_url(s.registered_model, s.version)}) (alias `candidate`), "
                     "from the best trial's last checkpoint.")
    else:
        lines.append("No model was registered: no ranked trial's checkpoint holds the exported model.")
    return "\n".join(lines)


def _log_summary(s: SweepSummary, space: dict, tracker) -> None:
    from methodlab.tracking import (BEST_CONFIG_TAG, BEST_RUN_ID_TAG, NOTE_TAG, REGISTERED_MODEL_TAG,
                                    REGISTERED_VERSION_TAG)

    tracker.log_text(s.parent_run_id, trials_csv(s.trials, space, s.metric), "trials.csv")
    if any(t.metric is not None for t in s.trials):
        tracker.log_object(s.parent_run_id, metric_plot(s.trials, space, s.metric), "metric_vs_params.png")
    summary = {"sweep": s.name, "metric": s.metric, "mode": s.mode, "trials": len(s.trials),
               "stopped_early": sum(t.stopped_early for t in s.trials),
               "failed": sum(t.status == "FAILED" for t in s.trials), "trial_epochs": s.trial_epochs,
               "best": None if s.best is None else {"run_name": s.best.run_name, "run_id": s.best.run_id,
                                                    s.metric: s.best.metric, "config": s.best.params},
               "registered_model": s.registered_model, "version": s.version}
    tracker.log_object(s.parent_run_id, summary, "summary.json")
    metrics = {"trials": len(s.trials), "trials_stopped_early": summary["stopped_early"],
               "trial_epochs": s.trial_epochs}
    if s.best is not None:
        metrics[f"best_{s.metric}"] = s.best.metric
    tracker.log_metrics(s.parent_run_id, metrics, step=0)
    tags = {NOTE_TAG: parent_note(s, tracker)}
    if s.best is not None:
        tags.update({BEST_RUN_ID_TAG: s.best.run_id, BEST_CONFIG_TAG: json.dumps(s.best.params),
                     REGISTERED_VERSION_TAG: s.version or "none"})
    if s.version:
        tags[REGISTERED_MODEL_TAG] = s.registered_model
    tracker.set_tags(s.parent_run_id, tags)
