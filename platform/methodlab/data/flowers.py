"""Oxford Flowers-102 (Nilsback & Zisserman, ICVGIP 2008) from its release files, into the
platform's Parquet layout.

    methodlab data import-flowers102 ~/data/flowers102 --out s3://bucket/datasets/flowers102 --size 64
    methodlab train bad_batches data.dataset=s3://bucket/datasets/flowers102

Files: jpg/image_00001.jpg .. image_08189.jpg; imagelabels.mat, key 'labels' (1, 8189), the class
1..102 of each image; setid.mat, keys 'trnid', 'valid', 'tstid' (1, n), 1-based image ids of the
official split (1,020 / 1,020 / 6,149). MATLAB v5 files, read with scipy.

The official split is kept as train / val / test. The release carries no class names, so the
classes are named by their label number, "1" .. "102" (meta["classes"][k] is the name of label k,
0-based). Images are decoded in `importing`'s process pool (as `data import` does), converted to
RGB and resized to size x size: uint8 (3, size, size) with scale 1/255 and the train split's
mean/std.
"""

from __future__ import annotations

import os

import numpy as np

from methodlab.data.dataset import Column, DatasetInfo, open_dataset
from methodlab.data.importing import (DecodePool, ImportWriter, chunks, image_column, load_mat, mat_field,
                                      require_files)
from methodlab.errors import DataError

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
CHUNK_FILES = 64


def _ids(mat: dict, key: str, path: str, n: int) -> np.ndarray:
    """1-based image ids of a setid.mat key -> 0-based rows into imagelabels."""
    ids = mat_field(mat, key, path).ravel().astype(np.int64)
    if len(ids) == 0 or ids.min() < 1 or ids.max() > n:
        raise DataError(f"{path}: key {key!r} must hold 1-based image ids in 1..{n} "
                        f"(got {f'{ids.min()}..{ids.max()}' if len(ids) else 'none'})")
    return ids - 1


def import_flowers102(folder: str, out: str, size: int = 64, workers: int | None = None) -> DatasetInfo:
    """<folder>/{jpg/, imagelabels.mat, setid.mat} -> the Parquet layout at `out` (path or s3:// URI)."""
    paths = require_files(folder, ("imagelabels.mat", "setid.mat"),
                          f"Flowers-102 needs jpg/, imagelabels.mat and setid.mat in {folder}")
    labels_raw = mat_field(load_mat(paths["imagelabels.mat"]), "labels", paths["imagelabels.mat"]).ravel()
    if len(labels_raw) == 0 or labels_raw.min() < 1:
        raise DataError(f"{paths['imagelabels.mat']}: key 'labels' must hold classes 1..102, one per image")
    labels = labels_raw.astype(np.int64) - 1
    num_classes = int(labels.max()) + 1
    setid = load_mat(paths["setid.mat"])
    splits = {s: _ids(setid, key, paths["setid.mat"], len(labels)) for s, key in SPLIT_KEYS.items()}
    files = [os.path.join(folder, "jpg", f"image_{i + 1:05d}.jpg") for i in range(len(labels))]
    for split, rows in splits.items():        # every listed image, before anything is decoded
        missing = next((files[i] for i in rows if not os.path.isfile(files[i])), None)
        if missing:
            raise DataError(f"{missing} does not exist ({paths['setid.mat']} lists it in "
                            f"{SPLIT_KEYS[split]!r}); restore it from 102flowers.tgz")
    columns = {"image": image_column(3, size), "label": Column("int64")}
    meta = {"num_classes": num_classes, "classes": [str(k + 1) for k in range(num_classes)],
            "class_names": "none in the release: classes are named by their label number (1..102)",
            "source": f"Flowers-102 {os.path.abspath(folder)}",
            "split": "official setid.mat: trnid / valid / tstid -> train / val / test"}
    with DecodePool(workers) as pool, \
            ImportWriter(out, os.path.basename(os.path.normpath(folder)), columns, list(splits), meta) as w:
        for split, rows in splits.items():
            tasks = ((idx, [files[i] for i in idx], "RGB") for idx in chunks(rows, CHUNK_FILES))
            for idx, decoded in pool.decode_strict(tasks, size):
                w.append(split, {"image": decoded, "label": labels[idx]})
    return open_dataset(out)
