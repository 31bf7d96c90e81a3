"""Typed run configs, merged in layers: code defaults, then a YAML file, then `key=value` overrides.

    cfg = load_config("supervised", "jobs/configs/supervised.yaml", ["train.lr=3e-4"])

Sections: `method` (the method's own config class), `data`, `train`, `scaling`, `storage`,
`tracking`. Every section forbids unknown keys; a misspelled key fails with the closest valid key,
a bad value with its dotted path and the layer that set it. YAML (files and override values) is
read with duplicate keys and anchors/aliases refused (`StrictLoader`); an override under a key
the YAML sets to a value is refused rather than dropping it; locations are a local path or a
lowercase s3://bucket/prefix (`check_location`). The resolved config is what runs, what
MLflow records (as params and as `config.yaml`) and what the run name is derived from.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from collections.abc import Hashable
from collections.abc import Hashable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from methodlab.errors import ConfigError
from methodlab.redact import redact_value

# Everything methodlab writes by default lives here (datasets, runs, the MLflow SQLite file).
HOME_ENV = "METHODLAB_HOME"


def methodlab_home() -> Path:
    return Path(os.environ.get(HOME_ENV, ".methodlab")).resolve()


def default_tracking_uri() -> str:
    """The MLflow store of a run that sets no tracking.uri: SQLite under $METHODLAB_HOME."""
    # Deliberately not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable
    # process-wide, so a later run would silently track into an earlier run's server.
    return f"sqlite:///{methodlab_home() / 'mlflow.db'}"


# A location (storage.path, data.dataset, data.root, `data import --out`): a local path or a
# lowercase s3://bucket/prefix. A bucket name follows S3's rules (3-63 lowercase letters,
# digits, '.', '-'); the prefix has no empty segments. Anything with a scheme-like start (`s3:/x`,
# `S3://`, `gs://`) would otherwise be taken as a relative local path or fail deep in pyarrow.
S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/?#@\s]+)*/?")
SCHEME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def check_location(value: str) -> str:
    """A local path or a well-formed s3://bucket/prefix; ValueError (one line) otherwise."""
    if SCHEME_LIKE.match(value) and not S3_URI.fullmatch(value):
        if value.lower().startswith("s3:") and "@" in value:
            raise ValueError("an S3 URI carries no credentials; put them in AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY and write s3://bucket/prefix")
        raise ValueError("use a local path or s3://bucket/prefix (a lowercase bucket name of 3-63 letters, "
                         "digits, '.', '-'); write ./ before a local path with ':'")
    return value


def check_name(value: str | None, max_len: int) -> str | None:
    """A run or sweep name: it becomes a storage directory and an MLflow search term."""
    if value is not None and not re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{max_len - 1}}}", value):
        raise ValueError(f"use letters, digits, '_', '.', '-' (at most {max_len} characters)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    dataset: str = Field("", description="built-in name (see `methodlab data list`) or a dataset "
                         "directory / s3:// URI; empty means the method's default dataset")
    root: str = Field("", description="where built-in datasets are prepared; default $METHODLAB_HOME/data")
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: every split is held once per node in Ray's shared-memory object "
        "store and each worker draws a seeded shard per epoch (bit-exact resume); stream: Ray Data "
        "streams a train split shard (datasets beyond memory); auto: memory when the splits fit "
        "data.memory_budget_mb, else stream")
    memory_budget_mb: float | None = Field(
        None, gt=0, description="memory/auto: the MB per node the held splits (and tables) may take; "
        "default half the smallest node's object store")
    limit_rows: int | None = Field(None, gt=0, description="use only the first N training rows")
    allow_tiny: bool = Field(False, description="train on a train split smaller than one global batch "
                             "(train.batch_size x scaling.num_workers), which is otherwise refused")
    normalize: bool = Field(False, description="standardize scaled (uint8 image) columns per channel "
                            "with the manifest's train mean/std, on the device; the exported model then "
                            "takes standardized inputs. Default: the decoded values in [0, 1]")
    stream_cache_mb: int = Field(
        1024, ge=0, description="stream: a train split of at most this many MB (in memory) is read "
        "from Parquet once into Ray's object store and every epoch streams from there; larger "
        "splits are re-read each epoch; 0 = always re-read")
    shuffle_buffer_rows: int = Field(
        10_000, ge=0, description="stream: rows of Ray Data's local shuffle buffer, reseeded every "
        "epoch, on top of a seeded block order (see README, Data); 0 = block order only")

    @field_validator("dataset", "root")
    @classmethod
    def _location(cls, v: str) -> str:
        return check_location(v)


class TrainConfig(Section):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # torch.manual_seed takes at most 2**64 - 1; epoch seeds are derived modulo 2**63.
    seed: int = Field(0, ge=0, le=2**63 - 1)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    run_name: str | None = Field(None, description="default: <method>-<hash of the config>; "
                                 "submitting the same name again resumes that run")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint")
    num_to_keep: int = Field(2, gt=0, description="checkpoints kept in storage: this many best by the "
                             "method's metric, plus always the latest")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints (0: none by epoch count); "
                                  "stage ends and the last epoch are always checkpointed")
    checkpoint_every_s: float | None = Field(
        None, gt=0, description="also checkpoint when this many seconds passed since the last one, checked "
        "every train.log_every_steps steps (mid-epoch too: a resumed epoch skips the batches it had trained)")
    checkpoint_every_steps: int | None = Field(None, gt=0, description="also checkpoint every N optimizer steps "
                                               "(for long epochs; resumes mid-epoch exactly)")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="async: training goes on while Ray uploads the checkpoint; sync: wait for it")
    eval_every: int = Field(1, gt=0, description="epochs between evaluations (stage ends and the last "
                            "epoch are always evaluated)")
    log_every_steps: int = Field(50, gt=0, description="steps between reads of the losses (one host sync "
                                 "each: the NaN check and the wall-clock checkpoint decision happen there)")
    log_every_s: float = Field(30.0, gt=0, description="seconds between progress lines within an epoch "
                               "(rank 0; in job logs and other non-terminal output: a terminal gets a progress "
                               "bar); reads the wall clock only, the losses shown are those of the last read")
    lease_timeout_s: float = Field(120.0, gt=0, description="a run's lease (one submission per run name) "
                                   "whose heartbeat is older than this is taken over; renewed every third of it")

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        return check_name(v, 100)


class ScalingConfig(Section):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional, so Ray Data keeps a CPU for reads")
    sync_batchnorm: bool = Field(True, description="multi-worker runs normalize BatchNorm over the global "
                                 "batch, so a model trains the same at any scaling.num_workers")
    gpus_per_worker: float = Field(1.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the workers' placement group lays them on nodes (Ray's strategies): PACK fills "
        "a node first (fast all-reduce); STRICT_SPREAD puts every worker on another node")
    wait_for_nodes_s: float = Field(0.0, ge=0, description="on an autoscaling cluster: when the cluster is "
                                    "too small for the workers, ask the autoscaler for them and wait this "
                                    "long before refusing the run (0: refuse at once)")


class StorageConfig(Section):
    path: str = Field("", description="local directory or s3://bucket/prefix for checkpoints; "
                      "default $METHODLAB_HOME/runs")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default from AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="default from AWS_DEFAULT_REGION")
    local_fallback: str = Field("", description="with an s3:// path, rank 0 also keeps the latest checkpoint "
                                "here, so `methodlab train ... resume` can pick it up after an S3 outage; "
                                "default $METHODLAB_HOME/checkpoints")

    @field_validator("path")
    @classmethod
    def _location(cls, v: str) -> str:
        return check_location(v)


# `tracking.register` shares its name with ABCMeta.register of pydantic's metaclass; instances
# read the field (the metaclass method is not visible on them), so pydantic's warning is moot.
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig" shadows', category=UserWarning)


class TrackingConfig(Section):
    uri: str = Field("", description="MLflow tracking URI; default sqlite under $METHODLAB_HOME")
    experiment: str = "methodlab"
    registered_model: str = Field("", description="default methodlab-<method>")
    register_model: bool = Field(True, description="register the final model as a version")
    register: Literal["best", "last"] = Field(
        "best", description="best: the final stage's best evaluated epoch by the method's metric (its test "
        "metrics are what is reported); last: the last epoch's model")

    @field_validator("registered_model")
    @classmethod
    def _mlflow_model_name(cls, v: str) -> str:
        # MLflow's rules (mlflow.utils.validation._validate_model_name), checked here so a bad
        # name is refused before training rather than when the model is registered at its end.
        if any(c in v for c in "/:") or v != v.strip() or v.startswith(".."):
            raise ValueError("MLflow model names cannot contain '/' or ':', start with '..' or have "
                             "surrounding spaces; e.g. methodlab-supervised")
        return v


class RunConfig(Section):
    """The resolved config of one run. `method` is replaced by the method's own class."""

    method_name: str
    method: Section = Field(default_factory=Section)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    # Keys that do not change what is trained, so they do not change the derived run name.
    # `scaling` is how a run runs, not what it trains: a run may resume on another worker count
    # (README, "Runs, checkpoints, resume": what that means for exactness). It hashes as the
    # defaults of the keys it had when it was still hashed, so the names derived then stay valid.
    _NOT_HASHED = {"storage", "tracking", "scaling"}
    _SCALING_HASHED_AS_DEFAULT = {"num_workers", "use_gpu", "cpus_per_worker", "sync_batchnorm", "gpus_per_worker"}
    _NOT_HASHED_KEYS = {"train": {"run_name", "max_failures", "num_to_keep", "checkpoint_every",
                                  "checkpoint_every_s", "checkpoint_every_steps", "checkpoint_upload",
                                  "log_every_steps", "log_every_s", "lease_timeout_s"},
                        # where the loader may hold data, not what is trained (see identity())
                        "data": {"memory_budget_mb", "allow_tiny"},
                        # a name for values that the resolved config holds anyway
                        "method": {"preset"}}
    # Keys added after run names were first derived: hashed only when set away from their
    # default, so the name of a config that does not use them stays what it was.
    _HASHED_WHEN_SET = {"data": {"normalize", "shuffle_buffer_rows"}, "method": {"init"}}

    def identity(self) -> dict:
        """The keys that decide what is trained: what the derived run name hashes."""
        d = self.model_dump(mode="json", exclude=self._NOT_HASHED)
        d["scaling"] = ScalingConfig().model_dump(mode="json", include=self._SCALING_HASHED_AS_DEFAULT)
        for section, keys in self._NOT_HASHED_KEYS.items():
            for k in keys:
                d[section].pop(k, None)
        for section, keys in self._HASHED_WHEN_SET.items():
            fields = type(getattr(self, section)).model_fields
            for k in keys & fields.keys():          # method keys exist for some methods only
                if d[section].get(k) == fields[k].default:
                    d[section].pop(k)
        # `auto` hashes as `memory`: the loader it picks whenever the data fits, and the default
        # before auto existed, so names derived then stay valid. The driver pins this name on the
        # config it ships with the loader resolved (launch.choose_loader), so a run auto sends to
        # stream keeps the name too (its params record data.loader=stream).
        if d["data"]["loader"] == "auto":
            d["data"]["loader"] = "memory"
        return d

    def dataset_used(self) -> str:
        """The dataset a run trains on: data.dataset, or the method's default when it is empty."""
        from methodlab.registry import get_method

        return self.data.dataset or get_method(self.method_name).default_dataset

    def recorded(self) -> dict:
        """The resolved config as MLflow records it (params): data.dataset is the dataset used.
        The derived name still hashes data.dataset as set (an empty one as ''), see identity()."""
        d = self.model_dump(mode="json")
        d["data"]["dataset"] = self.dataset_used()
        return d

    def compared_identity(self) -> dict:
        """`identity()` to compare with the params a run or sweep logged: `auto` matches whichever
        loader that run was shipped with (logged resolved) or the sweep recorded (logged `auto`);
        data.dataset is the dataset used, as `recorded()` logs it."""
        d = self.identity()
        d["data"]["dataset"] = self.dataset_used()
        d.pop("scaling")           # (its stand-in defaults, not the values a run logged)
        if self.data.loader == "auto":
            d["data"].pop("loader")
        return d

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        return self.train.run_name or f"{self.method_name}-{self.fingerprint()}"

    def to_yaml(self) -> str:
        """The resolved config as saved with a run (MLflow, checkpoints), credentials redacted."""
        return redact_value(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Layering


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4). Values are parsed as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {text!r} is not key=value with a dotted key, e.g. train.lr=3e-4")
    try:
        value = load_yaml(raw) if raw != "" else None
    except StrictYAMLError as e:
        raise ConfigError(f"override {text!r}: {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), yaml_number(value)


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string; a value written that way is meant as a float."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)
    return value


def nest(path: list[str], value: Any) -> dict:
    """(["train", "lr"], 0.1) -> {"train": {"lr": 0.1}}: one dotted key as a config layer."""
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_path(tree: dict, path: list[str], value: Any, origin: str, set_in: str = "") -> None:
    """Set a dotted key in `tree`, refusing a key under a value. `set_in`: where that value was
    set, when not by an earlier override (the YAML file)."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            head, rest = ".".join(path[:i + 1]), ".".join(path[i + 1:])
            if set_in:
                raise ConfigError(f"{origin}: {head} is a value ({child!r}) {set_in}, not a section; "
                                  f"write {head} as a mapping there, or drop '.{rest}'")
            raise ConfigError(f"{origin}: {head} is a value, not a section; drop '.{rest}'")
        node = child
    node[path[-1]] = value


class StrictLoader(yaml.SafeLoader):
    """YAML for configs: a duplicate key is an error (not the last one silently winning), and
    anchors and aliases are refused, so a few hundred bytes cannot expand into gigabytes
    (a "billion laughs" alias bomb). Write repeated values out; configs are short."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            raise StrictYAMLError("anchors and aliases (&name, *name) are not supported; write the value out",
                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue        # SafeLoader's own error ("found unhashable key") follows
            if key in seen:
                raise StrictYAMLError(f"duplicate key {key!r}; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class StrictYAMLError(yaml.YAMLError):
    def __init__(self, problem: str, mark):
        self.problem, self.problem_mark = problem, mark


def load_yaml(text: str) -> Any:
    """`text` parsed by `StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file with -c")
    try:
        text = p.read_bytes().decode("utf-8")
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is binary, not YAML text; pass a YAML file with -c") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = f": {e.problem}" if isinstance(e, StrictYAMLError) else "; fix the syntax"
        raise ConfigError(f"config file {p} is not valid YAML{where}{problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of sections (method:, train:, ...)")
    return data


@functools.cache
def run_config_class(method_config: type[BaseModel]) -> type[RunConfig]:
    return create_model(f"RunConfig_{method_config.__name__}", __base__=RunConfig,
                        method=(method_config, Field(default_factory=method_config)))


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: dict, cls: type[BaseModel], origins: dict[str, str]) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    origin = origins.get(dotted) or next((o for k, o in origins.items() if k.startswith(dotted + ".")), None)
    where = f" (set {origin})" if origin else ""
    if err["type"] == "extra_forbidden":
        valid = _fields_at(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else \
            f"valid keys here: {', '.join(valid)}"
        return f"unknown config key {dotted}{where}; {hint}"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")      # a field validator's own one-line message
    return f"{dotted}: {msg}{got_s}{where}"


def resolve(method_name: str, layers: list[tuple[str, dict]]) -> RunConfig:
    """Merge `(origin, dict)` layers in order and validate. Raises ConfigError with one line."""
    from methodlab.registry import get_method

    method = get_method(method_name)
    cls = run_config_class(method.Config)
    merged: dict = {}
    origins: dict[str, str] = {}
    for origin, layer in layers:
        merged = deep_merge(merged, layer)
        for dotted in _flatten_keys(layer):
            # A value an earlier layer set where this one puts a section (`train.epochs={a: 1}`)
            # was replaced: an error there is this layer's, not the earlier one's.
            parts = dotted.split(".")
            for i in range(1, len(parts)):
                origins.pop(".".join(parts[:i]), None)
            origins[dotted] = origin
    if method.presets:
        name, preset = _preset(method, merged, origins)
        merged = deep_merge(preset, merged)
        for dotted in _flatten_keys(preset):
            origins.setdefault(dotted, f"by {method_name}'s preset {name!r}")
    merged["method_name"] = method_name
    try:
        cfg = cls.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], cls, origins)) from None
    for dotted, supported in (("train.optimizer", method.optimizers), ("data.loader", ("auto", *method.loaders))):
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in supported:
            where = f" (set {origins[dotted]})" if dotted in origins else ""
            raise ConfigError(f"{dotted}: method {method_name} supports {', '.join(supported)}, "
                              f"not {value!r}{where}; set {dotted}={supported[0]}")
    return _fill_defaults(cfg)


def _preset(method, merged: dict, origins: dict[str, str]) -> tuple[str, dict]:
    """The preset `method.preset` names in the merged layers (else the field's default) and its
    layer, with the selection recorded in it."""
    section = merged.get("method")
    name = section.get("preset") if isinstance(section, dict) else None
    if name is None:
        name = method.Config.model_fields["preset"].default
    if not isinstance(name, str) or name not in method.presets:
        where = f" (set {origins['method.preset']})" if "method.preset" in origins else ""
        raise ConfigError(f"method.preset: unknown preset {name!r} of {method.name}{where}; "
                          f"choose one of: {', '.join(sorted(method.presets))}")
    return name, deep_merge(method.presets[name], {"method": {"preset": name}})


def _flatten_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten_keys(v, key + ".") if isinstance(v, dict) else [key]
    return out


def _fill_defaults(cfg: RunConfig) -> RunConfig:
    """Turn empty defaults into absolute paths, so Ray workers (other cwd) see the same places."""
    home = methodlab_home()
    if not cfg.data.root:
        cfg.data.root = str(home / "data")
    if not cfg.storage.path:
        cfg.storage.path = str(home / "runs")
    elif "://" not in cfg.storage.path:
        cfg.storage.path = str(Path(cfg.storage.path).resolve())
    if not cfg.storage.local_fallback:
        cfg.storage.local_fallback = str(home / "checkpoints")
    if not cfg.tracking.uri:
        cfg.tracking.uri = default_tracking_uri()
    if not cfg.tracking.registered_model:
        cfg.tracking.registered_model = f"methodlab-{cfg.method_name}"
    return cfg


def load_config(method_name: str, yaml_path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults (platform, then the method's), then the YAML file, then `key=value` overrides."""
    from methodlab.registry import get_method

    method = get_method(method_name)
    layers: list[tuple[str, dict]] = [(f"by {method_name}'s defaults", method.defaults)]
    if yaml_path:
        data = read_yaml(yaml_path)
        data.pop("method_name", None)
        layers.append((f"in {yaml_path}", data))
    # The YAML's values with the overrides set into them: a key under a value is refused, so an
    # override never replaces (drops) the YAML's value of a section without a word.
    tree: dict = copy.deepcopy(data) if yaml_path else {}
    overridden: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        set_by = "" if any(".".join(path[:i]) in overridden for i in range(1, len(path))) else f"in {yaml_path}"
        set_path(tree, path, value, f"override {text!r}", set_by)
        overridden.add(".".join(path))
        layers.append((f"by override {text!r}", nest(path, value)))
    return resolve(method_name, layers)


def from_dict(d: dict) -> RunConfig:
    """Rebuild a resolved config (e.g. in a Ray worker, or from a checkpoint)."""
    d = dict(d)
    return resolve(d.pop("method_name"), [("as resolved", d)])


def _type_name(annotation) -> str:
    """A field's type as a user types it: `auto|memory|stream` for a Literal, `int?` for Optional."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return "|".join(named) + ("?" if type(None) in args else "")
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def config_keys_help(method_name: str) -> str:
    """Every config key of a run of `method_name`, its type, the value it has with nothing set
    (the platform's defaults under the method's) and its description: what `methodlab train
    <method> --help` lists, generated from the pydantic models so it cannot drift."""
    cfg = load_config(method_name)
    rows = []
    for section in ("method", "data", "train", "scaling", "storage", "tracking"):
        values = getattr(cfg, section)
        for name, field in type(values).model_fields.items():
            value = getattr(values, name)
            shown = "''" if value == "" else ("null" if value is None else yaml_dump_inline(value))
            rows.append((f"{section}.{name}", _type_name(field.annotation), shown, field.description or ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"config keys of {method_name} (set with key=value, or in the -c YAML by section):"]
    lines += [f"  {k:<{width[0]}}  {t:<{width[1]}}  {v:<{width[2]}}  {d}".rstrip() for k, t, v, d in rows]
    return "\n".join(lines)


def yaml_dump_inline(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()
