"""Built-in datasets, made from data that installed packages ship (no downloads at run time).

`digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey images in 10 classes, as
`image` uint8 (1, 8, 8), the ink counts 0..16 with scale 1/16 (decoded on the device to exactly
the float32 values in [0, 1]; `methodlab.data.decode`), and `label` int64, with a fixed
stratified 60/20/20 train/val/test split (seed 0). Other modules register further datasets built
from it.
"""

from __future__ import annotations

import numpy as np

from methodlab.registry import register_dataset

SPLIT_SEED = 0


DIGIT_SCALE = 1 / 16      # sklearn's digits count ink in 0..16 per pixel


def load_digit_counts() -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 8, 8) uint8 ink counts 0..16, (N,) int64 labels: what the image datasets store."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return d.images.astype(np.uint8)[:, None], d.target.astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 8, 8) float32 in [0, 1]: for datasets derived from the pixels (features, modalities)."""
    counts, labels = load_digit_counts()
    return counts.astype(np.float32) * np.float32(DIGIT_SCALE), labels


def stratified_split(labels: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Row indices per split, stratified by label, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def heldout_rows(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
    """A boolean mask holding out `fraction` of each class's rows (at least one when a class has
    two or more rows), fixed by `seed`."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * len(idx)))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        mask[idx[:k]] = True
    return mask


@register_dataset("digits")
def digits() -> dict:
    images, labels = load_digit_counts()
    splits = stratified_split(labels)
    return {
        "splits": {s: {"image": images[i], "label": labels[i]} for s, i in splits.items()},
        "scales": {"image": DIGIT_SCALE},
        "meta": {"num_classes": 10, "classes": [str(c) for c in range(10)],
                 "source": "sklearn.datasets.load_digits", "split": "stratified 60/20/20, seed 0"},
    }
