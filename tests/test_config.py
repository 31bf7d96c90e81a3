"""Config layering and validation: defaults < YAML < key=value overrides; one-line errors."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from methodlab.config import deep_merge, load_config, parse_override
from methodlab.errors import ConfigError

FLOATS = st.floats(min_value=1e-6, max_value=10, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(yaml_lr=FLOATS, cli_lr=st.one_of(st.none(), FLOATS), epochs=st.integers(1, 50))
def test_layers_apply_in_order(tmp_path_factory, yaml_lr, cli_lr, epochs):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": yaml_lr, "epochs": epochs}}))
    overrides = [f"train.lr={cli_lr!r}"] if cli_lr is not None else []
    cfg = load_config("supervised", str(path), overrides)
    assert cfg.train.lr == pytest.approx(cli_lr if cli_lr is not None else yaml_lr)
    assert cfg.train.epochs == epochs
    # Untouched keys keep the method's defaults, then the platform's.
    assert cfg.train.batch_size == load_config("supervised").train.batch_size


def test_method_defaults_override_platform_defaults():
    from methodlab.config import TrainConfig

    assert load_config("supervised").train.lr == 2e-3 != TrainConfig().lr


@settings(max_examples=60, deadline=None)
@given(a=st.dictionaries(st.sampled_from("abc"), st.integers() | st.dictionaries(st.sampled_from("xy"), st.integers())),
       b=st.dictionaries(st.sampled_from("abc"), st.integers() | st.dictionaries(st.sampled_from("xy"), st.integers())))
def test_deep_merge_right_wins_and_keeps_left_only_keys(a, b):
    merged = deep_merge(a, b)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            assert merged[k] == {**a[k], **v}
        else:
            assert merged[k] == v
    for k in a.keys() - b.keys():
        assert merged[k] == a[k]


@settings(max_examples=50, deadline=None)
@given(value=st.one_of(st.integers(-10**6, 10**6), st.booleans(), FLOATS,
                       st.text("abcdefghij_", min_size=1, max_size=8)))
def test_override_values_parse_as_yaml_scalars(value):
    path, parsed = parse_override(f"section.key={value}")
    assert path == ["section", "key"]
    assert parsed == value or (isinstance(value, float) and parsed == pytest.approx(value))


@pytest.mark.parametrize("override,message", [
    ("train.lrr=0.1", "unknown config key train.lrr (set by override 'train.lrr=0.1'); did you mean train.lr?"),
    ("trian.lr=0.1", "unknown config key trian (set by override 'trian.lr=0.1'); did you mean train?"),
    ("method.arhc=cnn", "unknown config key method.arhc (set by override 'method.arhc=cnn'); did you mean method.arch?"),
    ("train.lr=-1", "train.lr: Input should be greater than 0 (got -1)"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0 (got 0)"),
    ("train.epochs=many", "train.epochs: Input should be a valid integer"),
    ("scaling.num_workers=-2", "scaling.num_workers: Input should be greater than 0"),
    ("train.optimizer=adamw2", "train.optimizer: Input should be 'adam', 'adamw' or 'sgd'"),
    ("train.run_name=a/b", "train.run_name: use letters, digits"),
    ("lr", "override 'lr' is not key=value"),
])
def test_bad_overrides_fail_with_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("supervised", None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line"):
        load_config("supervised", str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("supervised", str(listy))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("supervised", str(tmp_path / "missing.yaml"))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"train.batchsize \(set in .*typo.yaml\); did you mean train.batch_size"):
        load_config("supervised", str(typo))


def test_unknown_method_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'supervised'"):
        load_config("supervize")


def test_run_name_is_deterministic_and_ignores_where_results_go():
    a = load_config("supervised", None, ["train.lr=0.01"])
    b = load_config("supervised", None, ["train.lr=0.01", "tracking.experiment=other", "train.max_failures=3"])
    c = load_config("supervised", None, ["train.lr=0.02"])
    assert a.run_name == b.run_name != c.run_name
    assert load_config("supervised", None, ["train.run_name=mine"]).run_name == "mine"


def test_resolved_config_round_trips(tmp_path):
    from methodlab.config import from_dict

    cfg = load_config("supervised", None, ["train.lr=0.01", "method.arch_kwargs={width: 8}"])
    again = from_dict(cfg.model_dump(mode="json"))
    assert again == cfg
    saved = tmp_path / "resolved.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config("supervised", str(saved)) == cfg


def test_print_config_shows_the_resolved_layers_and_starts_nothing(home, capsys):
    from pathlib import Path

    from methodlab.cli import main

    yaml_path = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "supervised.yaml")
    assert main(["train", "supervised", "-c", yaml_path, "--print-config", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("supervised", yaml_path, ["train.lr=0.01"])
    assert out.startswith(f"# run name: {cfg.run_name}\n")
    assert yaml.safe_load(out) == cfg.model_dump(mode="json") and cfg.train.lr == 0.01
    assert not home.exists()          # no MLflow store, no run directory, no dataset written


def test_presets_state_defaults_once_and_every_layer_goes_on_top(tmp_path):
    """D3GZSL's presets: `digits` (the default, what the built-in data needs) and `cub` (the
    official setting jobs/configs/d3gzsl.yaml selects); YAML and overrides change single keys."""
    from methodlab.config import from_dict
    from methodlab.registry import get_method

    presets = get_method("d3gzsl").presets
    digits, cub = load_config("d3gzsl"), load_config("d3gzsl", None, ["method.preset=cub"])
    for cfg, name in ((digits, "digits"), (cub, "cub")):
        assert cfg.method.preset == name
        for section, values in presets[name].items():
            assert {k: getattr(getattr(cfg, section), k) for k in values} == values
    assert (digits.method.gen_hidden, cub.method.gen_hidden) == (512, 4096)
    yaml_path = tmp_path / "cub.yaml"
    yaml_path.write_text("method:\n  preset: cub\n  gen_hidden: 64\n")
    layered = load_config("d3gzsl", str(yaml_path), ["train.epochs=3"])
    assert (layered.method.gen_hidden, layered.method.critic_hidden, layered.train.epochs) == (64, 4096, 3)
    # The preset only names values the resolved config holds: it is not part of the run name.
    spelled_out = [f"{s}.{k}={v}" for s, values in presets["digits"].items() for k, v in values.items()]
    assert load_config("d3gzsl", None, ["method.preset=cub", *spelled_out]).run_name == digits.run_name
    assert from_dict(cub.model_dump(mode="json")) == cub


def test_unknown_preset_fails_with_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config("d3gzsl", None, ["method.preset=imagenet"])
    assert str(e.value) == ("method.preset: unknown preset 'imagenet' of d3gzsl (set by override "
                            "'method.preset=imagenet'); choose one of: cub, digits")


def test_derived_run_names_survive_new_config_keys(monkeypatch):
    """A run submitted again without a name resumes only if its derived name is unchanged. These
    are the names the code of before uint8 storage, presets and the auto loader derived (issues
    15-17) for the same home; a key added since is hashed only when set away from its default
    (RunConfig._HASHED_WHEN_SET), and a key that changes training changes the name."""
    monkeypatch.setenv("METHODLAB_HOME", "/srv/methodlab")
    assert load_config("supervised").run_name == "supervised-ac54bd5478"
    # MMANet's defaults changed what it trains (issue 19: the official mining window, accuracy_gap
    # mining), so its name changed with them: mmanet-9ab008946d before.
    assert load_config("mmanet").run_name == "mmanet-8a482214d7"
    assert load_config("supervised", None, ["data.normalize=true"]).run_name != "supervised-ac54bd5478"
    assert load_config("supervised", None, ["data.shuffle_buffer_rows=64"]).run_name != "supervised-ac54bd5478"


def test_train_help_lists_every_config_key_of_the_method_with_type_value_and_description(capsys):
    from methodlab.cli import main
    from methodlab.registry import get_method

    assert main(["train", "toast", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: methodlab train" in out
    cfg = load_config("toast")
    for section in ("method", "data", "train", "scaling", "storage", "tracking"):
        for name in type(getattr(cfg, section)).model_fields:
            assert f"  {section}.{name} " in out, f"{section}.{name} missing from the help"
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("method.mode "))
    assert "toast|toast-lite|linear|finetune" in line and " toast " in line           # type, value
    assert next(ln for ln in out.splitlines() if ln.strip().startswith("train.epochs ")).split()[2] == \
        str(get_method("toast").defaults["train"]["epochs"])                          # the method's default
    assert main(["train", "supervize", "--help"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: method: unknown method 'supervize'")
