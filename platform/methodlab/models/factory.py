"""A model from its spec, `{"arch": <registered name>, "kwargs": {...}}` (timm's `_factory.py`).
Model modules that wrap other models (canonicalizer) build them here, not through the package."""

from __future__ import annotations

from typing import Any

from methodlab.registry import get_model_builder


def build_model(spec: dict[str, Any]):
    return get_model_builder(spec["arch"])(**spec.get("kwargs", {}))
