"""STL-10 (Coates, Lee & Ng, AISTATS 2011) from its binary release, into the platform's Parquet layout.

    methodlab data import-stl10 ~/data/stl10_binary --out s3://bucket/datasets/stl10
    methodlab train bad_batches data.dataset=s3://bucket/datasets/stl10 data.loader=stream
    methodlab data import-stl10 ~/data/stl10_binary --out /data/stl10-labelled --no-unlabeled
    methodlab train supervised data.dataset=/data/stl10-labelled

Files (stl10_binary/): train_X.bin, train_y.bin (5,000), test_X.bin, test_y.bin (8,000),
unlabeled_X.bin (100,000; 2.7 GB), class_names.txt (one name a line), optional
fold_indices.txt (10 lines of 1,000 0-based train indices: the official 1,000-image training
folds). X: uint8, each image 3 x 96 x 96, every channel stored column-major (MATLAB order), so
an image reads (3, W, H) and is transposed to (3, H, W). y: uint8 labels 1..10.

Layout, for SSL pretraining with a labelled probe (`bad_batches`):
  train   the labelled train images minus val (labels 0..9), then the 100,000 unlabeled images
          with label -1 (torchvision's "train+unlabeled" convention). bad_batches trains SimCLR
          on every train row and fits its linear probe and k-NN bank on the rows with a label
          (>= 0) only; val and test are labelled. The labelled rows come first, so
          data.limit_rows takes labelled rows.
  val     10% of each class of train_X (seed 0): 500 images.
  test    test_X, the official 8,000.
`--no-unlabeled` leaves the unlabeled images out, for methods that need a label on every train
row (supervised, TOAST). meta: num_classes, classes, unlabeled_rows, folds (when
fold_indices.txt is there, as 0-based rows of train_X), source, split.

The files are memory-mapped and written in chunks of CHUNK rows (28 MB), never a whole split
in memory.
"""

from __future__ import annotations

import os

import numpy as np

from methodlab.data.builtin import SPLIT_SEED, heldout_rows
from methodlab.data.dataset import Column, DatasetInfo, open_dataset
from methodlab.data.importing import ImportWriter, chunks, image_column, require_files
from methodlab.errors import DataError

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE      # 27,648
UNLABELED = -1                     # the label of the unlabeled images in the train split
VAL_FRACTION = 0.1
CHUNK = 1024


def images(path: str) -> np.memmap:
    """(N, 3, 96, 96) uint8 as stored, (C, W, H) per image: a read-only memory map."""
    size = os.path.getsize(path)
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"{path} is {size:,} bytes, not a multiple of 3 x 96 x 96 = {IMAGE_BYTES:,} "
                        "(truncated or not an STL-10 X file); download it again")
    return np.memmap(path, np.uint8, "r", shape=(size // IMAGE_BYTES, 3, SIDE, SIDE))


def to_chw(raw: np.ndarray) -> np.ndarray:
    """(k, 3, W, H) column-major as stored -> (k, 3, H, W) row-major, contiguous."""
    return np.ascontiguousarray(raw.transpose(0, 1, 3, 2))


def labels(path: str, n: int, num_classes: int, x_path: str) -> np.ndarray:
    """y file: n uint8 labels 1..num_classes -> 0-based int64."""
    y = np.fromfile(path, np.uint8).astype(np.int64)
    if len(y) != n:
        raise DataError(f"{path} has {len(y):,} labels but {x_path} has {n:,} images; "
                        "the pair must come from the same download")
    if len(y) and (y.min() < 1 or y.max() > num_classes):
        raise DataError(f"{path} holds labels {y.min()}..{y.max()}, expected 1..{num_classes} "
                        "(one per line of class_names.txt)")
    return y - 1


def _folds(path: str, n: int) -> list[list[int]]:
    try:
        folds = [[int(v) for v in line.split()] for line in open(path) if line.strip()]
    except ValueError:
        raise DataError(f"{path} must hold whitespace-separated integer indices, one fold a line") from None
    bad = [v for fold in folds for v in fold if not 0 <= v < n]
    if bad:
        raise DataError(f"{path} holds index {bad[0]}, outside the 0..{n - 1} rows of train_X.bin")
    return folds


def import_stl10(folder: str, out: str, unlabeled: bool = True) -> DatasetInfo:
    """stl10_binary/ -> the Parquet layout at `out` (path or s3:// URI); see the module docstring."""
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"]
    paths = require_files(folder, needed + ["unlabeled_X.bin"] * unlabeled,
                          f"STL-10 needs {', '.join(needed)}{' and unlabeled_X.bin' if unlabeled else ''} "
                          f"in {folder} (the extracted stl10_binary archive; --no-unlabeled to do without "
                          "the unlabeled images)")
    classes = [line.strip() for line in open(paths["class_names.txt"]) if line.strip()]
    x = {s: images(paths[f"{s}_X.bin"]) for s in ("train", "test", *["unlabeled"] * unlabeled)}
    y = {s: labels(paths[f"{s}_y.bin"], len(x[s]), len(classes), paths[f"{s}_X.bin"]) for s in ("train", "test")}
    held = heldout_rows(y["train"], VAL_FRACTION, SPLIT_SEED)
    meta = {"num_classes": len(classes), "classes": classes, "source": f"STL-10 {os.path.abspath(folder)}",
            "unlabeled_rows": len(x["unlabeled"]) if unlabeled else 0, "unlabeled_label": UNLABELED,
            "split": f"val: {VAL_FRACTION:g} of each class of train_X (seed {SPLIT_SEED}); train: the rest of "
                     f"train_X{', then unlabeled_X with label -1' if unlabeled else ''}; test: test_X"}
    folds_path = os.path.join(folder, "fold_indices.txt")
    if os.path.isfile(folds_path):
        meta["folds"] = _folds(folds_path, len(x["train"]))
    columns = {"image": image_column(3, SIDE), "label": Column("int64")}
    with ImportWriter(out, os.path.basename(os.path.normpath(folder)), columns, ["train", "val", "test"], meta) as w:
        # (split, source, rows of the source, labels of those rows); labelled train rows first.
        plan = [("train", "train", np.flatnonzero(~held)), ("val", "train", np.flatnonzero(held)),
                ("test", "test", np.arange(len(x["test"])))]
        if unlabeled:
            plan.append(("train", "unlabeled", np.arange(len(x["unlabeled"]))))
        for split, source, rows in plan:
            for part in chunks(rows, CHUNK):
                label = y[source][part] if source in y else np.full(len(part), UNLABELED, np.int64)
                w.append(split, {"image": to_chw(x[source][part]), "label": label})   # reads these rows only
    return open_dataset(out)
