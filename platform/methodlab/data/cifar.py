"""CIFAR-10 and CIFAR-100 from the "python version" pickles (Krizhevsky, 2009), into the platform's
Parquet layout.

    methodlab data import-cifar10 ~/data/cifar-10-batches-py --out s3://bucket/datasets/cifar10
    methodlab data import-cifar100 ~/data/cifar-100-python --out /data/cifar100
    methodlab train supervised data.dataset=/data/cifar100

Files: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; cifar-100-python/{train,
test, meta}. Each is a Python 2 pickle (protocol 2) of a dict with bytes keys: b'data' uint8
(N, 3072), each row the R, G and B planes of a 32x32 image, row-major; b'labels' (CIFAR-10) or
b'fine_labels' and b'coarse_labels' (CIFAR-100), lists of ints; b'filenames', b'batch_label'.
The meta file holds b'label_names' (CIFAR-10) or b'fine_label_names' and b'coarse_label_names'.

The pickles are read by a restricted Unpickler: the only globals it resolves are numpy's array
reconstruction and dtype (and `_codecs.encode`, which Python 3 writes for bytes at protocol 2),
so a pickle naming anything else is refused before any of it runs. Never `pickle.load` a file
you downloaded.

Layout: image uint8 (3, 32, 32) with scale 1/255 and the train split's mean/std; label int64
(CIFAR-100: the fine label, 100 classes); CIFAR-100 also keeps `coarse_label` int64 (the 20
superclasses, named in meta["coarse_classes"]). Splits: test is the official test batch; val is
10% of each class of the official training batches (seed 0: 45,000 / 5,000 / 10,000 rows),
train the rest.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle

import numpy as np

from methodlab.data.builtin import SPLIT_SEED, heldout_rows
from methodlab.data.dataset import Column, DatasetInfo, open_dataset
from methodlab.data.importing import ImportWriter, image_column, require_files
from methodlab.errors import DataError

VAL_FRACTION = 0.1
ROW = 3 * 32 * 32                 # R, G, B planes of 32 x 32


class _ArraysOnly(pickle.Unpickler):
    """Resolves the globals a numpy array needs and nothing else."""

    _reconstruct = np.empty(0).__reduce__()[0]     # numpy.core (1.x) or numpy._core (2.x)
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def load_batch(path: str) -> dict:
    """One CIFAR pickle as a dict with str keys. Raises DataError naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a CIFAR batch: {e} (a CIFAR pickle holds only numpy arrays, "
                        "lists and strings); download the dataset again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {str(e)[:80]}); "
                        "download it again") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; download it again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _key(batch: dict, key: str, path: str):
    if key not in batch:
        raise DataError(f"{path} lacks key b'{key}' (has {', '.join(sorted(batch))}); is it a "
                        f"{'CIFAR-100' if key.startswith(('fine', 'coarse')) else 'CIFAR-10'} file?")
    return batch[key]


def _names(meta: dict, key: str, path: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _key(meta, key, path)]


def read_batch(path: str, label_keys: tuple[str, ...], num_classes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """{"image": (N, 3, 32, 32) uint8, <label key>: (N,) int64 ...}, checked against the format."""
    batch = load_batch(path)
    data = _key(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: b'data' must be a uint8 array (N, {ROW}), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if data.shape[1] != ROW:
        raise DataError(f"{path}: b'data' rows hold {data.shape[1]} values, expected {ROW} "
                        "(R, G, B planes of 32 x 32); the batch is damaged, download it again")
    out = {"image": data.reshape(-1, 3, 32, 32)}          # planes -> (C, H, W), row-major: no copy
    for key, k in zip(label_keys, num_classes):
        labels = np.asarray(_key(batch, key, path), dtype=np.int64)
        if labels.shape != (len(data),):
            raise DataError(f"{path}: b'{key}' has {labels.size} labels for {len(data)} rows of b'data'")
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise DataError(f"{path}: b'{key}' holds {labels.min()}..{labels.max()}, outside 0..{k - 1}")
        out[key] = labels
    return out


def _import(folder: str, out: str, train_files: list[str], test_file: str, meta_file: str,
            label_keys: tuple[str, ...], name_keys: tuple[str, ...], what: str) -> DatasetInfo:
    """label_keys/name_keys: the file keys of `label` and (CIFAR-100) `coarse_label`, in that order."""
    paths = require_files(folder, [*train_files, test_file, meta_file], f"{what} needs {', '.join(train_files)}, "
                          f"{test_file} and {meta_file} in {folder} (the extracted python-version archive)")
    meta_raw = load_batch(paths[meta_file])
    names = [_names(meta_raw, k, paths[meta_file]) for k in name_keys]
    counts = tuple(len(n) for n in names)
    label_columns = dict(zip(("label", "coarse_label"), label_keys))      # column -> file key
    columns = {"image": image_column(3, 32), **{c: Column("int64") for c in label_columns}}
    meta = {"num_classes": counts[0], "classes": names[0], "source": f"{what} {os.path.abspath(folder)}",
            "split": f"test: {test_file}; val: {VAL_FRACTION:g} of each class of the training batches "
                     f"(seed {SPLIT_SEED}); train: the rest"}
    if len(names) > 1:
        meta["coarse_classes"] = names[1]
    # Batch by batch (10,000 rows, 30 MB each): every file is read and checked before its rows are
    # written, and a failure leaves nothing at `out` (ImportWriter).
    with ImportWriter(out, os.path.basename(os.path.normpath(folder)), columns, ["train", "val", "test"], meta) as w:
        for split, files in (("train", train_files), ("test", [test_file])):
            for file in files:
                batch = read_batch(paths[file], label_keys, counts)
                cols = {"image": batch["image"], **{c: batch[k] for c, k in label_columns.items()}}
                if split == "test":
                    w.append("test", cols)
                    continue
                # Per batch, stratified: the official batches are balanced within a few percent,
                # so 10% of each class per batch is 10% of each class overall.
                held = heldout_rows(cols["label"], VAL_FRACTION, seed=SPLIT_SEED + train_files.index(file))
                w.append("train", {k: v[~held] for k, v in cols.items()})
                w.append("val", {k: v[held] for k, v in cols.items()})
    return open_dataset(out)


def import_cifar10(folder: str, out: str) -> DatasetInfo:
    """cifar-10-batches-py/ -> the Parquet layout at `out` (path or s3:// URI)."""
    return _import(folder, out, [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                   ("labels",), ("label_names",), "CIFAR-10")


def import_cifar100(folder: str, out: str) -> DatasetInfo:
    """cifar-100-python/ -> the Parquet layout at `out`: fine labels as `label`, coarse as `coarse_label`."""
    return _import(folder, out, ["train"], "test", "meta", ("fine_labels", "coarse_labels"),
                   ("fine_label_names", "coarse_label_names"), "CIFAR-100")
