"""The built-in transfer task for TOAST: pretrain and pretune on digits 0-4, transfer to digits 5-9.

Both datasets are cut from the fixed stratified 60/20/20 split of scikit-learn's digits
(`methodlab.data.builtin.stratified_split`, seed 0), so no image is ever in two roles.

`digits_source`   digits 0-4 only, labels 0-4, splits train/val/test of the fixed split. What a
                  backbone is pretrained on (`methodlab train supervised data.dataset=digits_source`).
`digits_transfer` the target task, digits 5-9 relabelled 0-4:
                    train  the first `shots` rows per class of the fixed train split
                           (default TRANSFER_SHOTS = 10 labelled images per class, 50 rows),
                    val    every 5-9 row of the fixed val split,
                    test   every 5-9 row of the fixed test split;
                  plus the source data as side tables `source_train` and `source_val`
                  (image, label), which TOAST's `pretune` stage trains on.

Another number of shots is one `register_dataset` line away: `transfer_task(shots)` builds it.
"""

from __future__ import annotations

import numpy as np

from methodlab.data.builtin import DIGIT_SCALE, load_digit_counts, stratified_split
from methodlab.registry import register_dataset

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
TRANSFER_SHOTS = 10
SPLIT_NOTE = "fixed stratified 60/20/20 split of sklearn digits, seed 0"


def _rows(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, classes: tuple[int, ...],
          shots: int | None = None) -> dict[str, np.ndarray]:
    """The rows of `idx` whose label is in `classes`, relabelled to 0..len(classes)-1; with
    `shots`, only the first `shots` rows (in index order) of each class."""
    keep = []
    for c in classes:
        rows = idx[labels[idx] == c]
        keep.append(rows if shots is None else rows[:shots])
    rows = np.sort(np.concatenate(keep))
    remap = np.full(labels.max() + 1, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    return {"image": images[rows], "label": remap[labels[rows]]}


@register_dataset("digits_source")
def digits_source() -> dict:
    images, labels = load_digit_counts()
    splits = stratified_split(labels)
    return {
        "splits": {s: _rows(images, labels, i, SOURCE_CLASSES) for s, i in splits.items()},
        "scales": {"image": DIGIT_SCALE},
        "meta": {"num_classes": len(SOURCE_CLASSES), "classes": [str(c) for c in SOURCE_CLASSES],
                 "source": "sklearn.datasets.load_digits, digits 0-4", "split": SPLIT_NOTE},
    }


def transfer_task(shots: int) -> dict:
    """Target digits 5-9 with `shots` labelled training images per class; source 0-4 as tables."""
    images, labels = load_digit_counts()
    splits = stratified_split(labels)
    return {
        "splits": {"train": _rows(images, labels, splits["train"], TARGET_CLASSES, shots),
                   "val": _rows(images, labels, splits["val"], TARGET_CLASSES),
                   "test": _rows(images, labels, splits["test"], TARGET_CLASSES)},
        "scales": {"image": DIGIT_SCALE},
        "tables": {"source_train": _rows(images, labels, splits["train"], SOURCE_CLASSES),
                   "source_val": _rows(images, labels, splits["val"], SOURCE_CLASSES)},
        "meta": {"num_classes": len(TARGET_CLASSES), "classes": [str(c) for c in TARGET_CLASSES],
                 "source_classes": [str(c) for c in SOURCE_CLASSES], "shots_per_class": shots,
                 "source": "sklearn.datasets.load_digits; target 5-9 (relabelled 0-4), source 0-4 "
                           "in tables source_train/source_val",
                 "split": f"{SPLIT_NOTE}; train = first {shots} rows per class of the train split"},
    }


@register_dataset("digits_transfer")
def digits_transfer() -> dict:
    return transfer_task(TRANSFER_SHOTS)
