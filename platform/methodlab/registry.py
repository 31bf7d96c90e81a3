"""Decorator registries: methods (`@register_method`), model architectures (`@register_model`)
and built-in datasets (`@register_dataset`). Tests iterate these, so a new entry is tested by the
existing tests the moment it registers."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from methodlab.errors import ConfigError

T = TypeVar("T")

_METHODS: dict[str, type] = {}
_MODELS: dict[str, Callable] = {}
_DATASETS: dict[str, Callable] = {}


def _register(table: dict, kind: str, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = obj
        if isinstance(obj, type):
            obj.name = name
        return obj
    return deco


def register_method(name: str):
    return _register(_METHODS, "method", name)


def register_model(name: str):
    return _register(_MODELS, "model", name)


def register_dataset(name: str):
    return _register(_DATASETS, "dataset", name)


def _lookup(table: dict, kind: str, name: str, field: str):
    _load_builtins()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(sorted(table))}"
        raise ConfigError(f"{field}: unknown {kind} {name!r}; {hint}")
    return table[name]


def get_method(name: str):
    return _lookup(_METHODS, "method", name, "method")


def get_model_builder(name: str):
    return _lookup(_MODELS, "model architecture", name, "model arch")


def get_dataset_builder(name: str):
    return _lookup(_DATASETS, "built-in dataset", name, "data.dataset")


def method_names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def dataset_names() -> list[str]:
    _load_builtins()
    return sorted(_DATASETS)


def model_names() -> list[str]:
    _load_builtins()
    return sorted(_MODELS)


def _load_builtins() -> None:
    # Importing the packages runs their decorators.
    import methodlab.data.builtin  # noqa: F401
    import methodlab.methods  # noqa: F401
    import methodlab.models  # noqa: F401
