"""Decorator registries: methods (`@register_method`), model architectures (`@register_model`)
and built-in datasets (`@register_dataset`). Tests iterate these, so a new entry is tested by the
existing tests the moment it registers.

Only the tables and the decorators live here, and this module imports nothing of methodlab's but
its errors (timm's `_registry.py` is the model). The tables fill when their packages are
imported: `methodlab.methods`, `methodlab.models` and `methodlab.data` each import their own
modules, and the CLI and the Ray worker import `methodlab.methods` (which imports the other two).

Names are snake_case; an entry may keep older names as `aliases`, so saved model specs and
configs written under an old name still resolve.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, TypeVar

from methodlab.errors import ConfigError

T = TypeVar("T")


class Table:
    def __init__(self, kind: str, field: str, package: str):
        self.kind, self.field, self.package = kind, field, package
        self.entries: dict[str, object] = {}
        self.aliases: dict[str, str] = {}      # old name -> name
        self.meta: dict[str, dict] = {}        # what an entry declares about itself (a model's example)

    def register(self, name: str, aliases: tuple[str, ...] = (), **meta) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in (name, *aliases):
                if self.entries.get(key, obj) is not obj or self.aliases.get(key, name) != name:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
            self.entries[name] = obj
            self.aliases.update(dict.fromkeys(aliases, name))
            self.meta[name] = meta
            if isinstance(obj, type):
                obj.name = name
            return obj
        return deco

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def get(self, name: str):
        name = self.canonical(name)
        if name in self.entries:
            return self.entries[name]
        if not self.entries:
            # A library caller that looked a name up before importing the package that fills it.
            raise ConfigError(f"{self.field}: no {self.kind} is registered yet; import {self.package} first "
                              f"(the methodlab CLI and the Ray worker do)")
        close = difflib.get_close_matches(name, [*self.entries, *self.aliases], n=1)
        hint = f"did you mean {self.canonical(close[0])!r}?" if close else f"choose one of: {', '.join(self.names())}"
        raise ConfigError(f"{self.field}: unknown {self.kind} {name!r}; {hint}")

    def names(self) -> list[str]:
        return sorted(self.entries)


METHODS = Table("method", "method", "methodlab.methods")
MODELS = Table("model architecture", "model arch", "methodlab.models")
DATASETS = Table("built-in dataset", "data.dataset", "methodlab.data")


def register_method(name: str, aliases: tuple[str, ...] = ()):
    return METHODS.register(name, aliases)


def register_model(name: str, aliases: tuple[str, ...] = (), example: dict | None = None):
    """`example`: the smallest spec kwargs and input the registry-driven tests build the
    architecture from, `{"kwargs": {...}, "input": (B, ...)}` (tests/test_registry.py)."""
    return MODELS.register(name, aliases, example=example)


def register_dataset(name: str, aliases: tuple[str, ...] = ()):
    return DATASETS.register(name, aliases)


def get_method(name: str):
    return METHODS.get(name)


def get_model_builder(name: str):
    return MODELS.get(name)


def get_dataset_builder(name: str):
    return DATASETS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def model_names() -> list[str]:
    return MODELS.names()


def model_example(name: str) -> dict | None:
    return MODELS.meta[MODELS.canonical(name)].get("example")


def dataset_names() -> list[str]:
    return DATASETS.names()


def import_submodules(package: str, path) -> None:
    """Import every module of `package` (its `__path__`), in name order: a new method module
    registers by being there, with no list to extend (`methodlab/methods/__init__.py`)."""
    for module in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{module.name}")
