"""Datasets: the Parquet layout (`dataset`), built-in datasets (`builtin`), image-folder import."""

from __future__ import annotations

import os

from methodlab import storage
from methodlab.data.dataset import DatasetInfo, open_dataset, read_split, read_table, split_nbytes, write_dataset
from methodlab.errors import DataError

__all__ = ["DatasetInfo", "open_dataset", "read_split", "read_table", "split_nbytes", "write_dataset",
           "prepare_builtin", "resolve_dataset"]


def prepare_builtin(name: str, root: str, force: bool = False) -> DatasetInfo:
    """Write built-in dataset `name` under `root/name` unless it is already there (idempotent)."""
    from methodlab.registry import get_dataset_builder

    builder = get_dataset_builder(name)
    uri = f"{root.rstrip('/')}/{name}"
    if not force and storage.exists(f"{uri}/dataset.json"):
        try:
            return open_dataset(uri)
        except DataError:
            pass   # a corrupt copy of a built-in dataset is simply rebuilt
    built = builder()
    if not storage.is_s3(uri):
        os.makedirs(root, exist_ok=True)
    return write_dataset(uri, name, built["splits"], built["meta"], built.get("tables"))


def resolve_dataset(dataset: str, root: str) -> DatasetInfo:
    """A built-in name is prepared on first use; anything else is a dataset directory or URI."""
    from methodlab.registry import dataset_names

    if dataset in dataset_names():
        return prepare_builtin(dataset, root)
    return open_dataset(dataset)
