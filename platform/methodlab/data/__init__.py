"""Datasets: the Parquet layout (`dataset`), built-in datasets (`builtin` and the modules below,
each registering its own with `@register_dataset`), image-folder and xlsa17 import.

Importing this package registers every built-in dataset: none depends on a method using it.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys

from methodlab import storage
from methodlab.data import builtin  # noqa: F401  (digits)
from methodlab.data import digits_transfer  # noqa: F401  (digits_source, digits_transfer)
from methodlab.data import gzsl  # noqa: F401  (digits_gzsl, synthetic_gzsl)
from methodlab.data import multimodal  # noqa: F401  (digits_multimodal, synthetic_multimodal)
from methodlab.data import shapes  # noqa: F401  (shapes, shapes_upright, shapes_source, shapes_transfer, ...)
from methodlab.data.dataset import DatasetInfo, open_dataset, read_split, read_table, split_nbytes, write_dataset
from methodlab.errors import DataError
from methodlab.registry import DATASETS, dataset_names, get_dataset_builder

__all__ = ["DatasetInfo", "open_dataset", "read_split", "read_table", "split_nbytes", "write_dataset",
           "prepare_builtin", "resolve_dataset"]


def builder_version(builder) -> str:
    """A hash of the source of the module that defines a built-in dataset: a copy prepared by
    other code (new attributes, another split) is rebuilt, not reused because its name matches."""
    module = sys.modules[builder.__module__]
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:12]


def prepare_builtin(name: str, root: str, force: bool = False) -> DatasetInfo:
    """Write built-in dataset `name` under `root/name` unless that copy is there and was built by
    this code (idempotent). A stale or corrupt copy is replaced whole (`DatasetWriter` stages it)."""
    builder = get_dataset_builder(name)
    name = DATASETS.canonical(name)      # an old name writes (and finds) the current one's copy
    uri = f"{root.rstrip('/')}/{name}"
    version = builder_version(builder)
    if not force and storage.exists(f"{uri}/dataset.json"):
        try:
            info = open_dataset(uri)
            if info.meta.get("builder_version") == version:
                return info
        except DataError:
            pass   # a corrupt copy of a built-in dataset is simply rebuilt
    built = builder()
    if not storage.is_s3(uri):
        os.makedirs(root, exist_ok=True)
    return write_dataset(uri, name, built["splits"], {**built["meta"], "builder_version": version},
                         built.get("tables"), scales=built.get("scales"))


def resolve_dataset(dataset: str, root: str) -> DatasetInfo:
    """A built-in name is prepared on first use; anything else is a dataset directory or URI."""
    if DATASETS.canonical(dataset) in dataset_names():
        return prepare_builtin(dataset, root)
    return open_dataset(dataset)
