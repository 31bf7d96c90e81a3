"""Multimodal datasets: one tensor column per modality, any number M of modalities.

Layout (the platform's Parquet layout, `methodlab.data.dataset`):

    <modality>   one fixed-shape tensor column per modality, float32, any per-row shape
    packed       float32 (sum of the modalities' sizes,): every modality flattened and concatenated
                 in `meta["modalities"]` order, the single-tensor input of an exported model
    label        int64

Imported image modalities (`uint8_columns`: CASIA-SURF, NYUv2) are stored as uint8 with scale
1/255, `packed` too (uint8, the same scale): decoded on the device, packed equals the decoded
modalities concatenated, at a quarter of float32's bytes. (With data.normalize the modality
columns are standardized and packed, which has no channels, is not.)

`meta["modalities"]` lists the modality columns in order and `meta["packed_column"]` names the
packed column. `multimodal_splits` builds that layout from per-modality arrays; a user dataset
written with it (and `write_dataset`) can be trained on by any multimodal method.

Built-ins:

`digits_multimodal` (M = 3): scikit-learn's digits, each shown to three "sensors" that each carry
only part of the information (a logistic regression reaches about 0.86-0.89 test accuracy on any
single view and about 0.92 on all three, against 0.96 on the raw 8x8 image):
  image     (1, 4, 4)  the image mean-pooled 2x2: coarse shape, no fine strokes
  edges     (1, 8, 8)  binary edge map: kornia Sobel magnitude above the image's own median
                       (where strokes change, no intensities)
  profiles  (16,)      the 8 row means then the 8 column means of the image (projections only)
with the fixed stratified 60/20/20 split of `digits` (seed 0).

`synthetic_multimodal`: a small binary task whose per-modality informativeness is set exactly
(see `make_synthetic_multimodal`), for tests and for checking that mining finds the weak modality.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from methodlab.data.builtin import load_digits, stratified_split
from methodlab.data.dataset import Column
from methodlab.registry import register_dataset

PACKED = "packed"
DIGITS_MODALITIES = ("image", "edges", "profiles")


def pack(arrays: Sequence[np.ndarray], dtype=np.float32) -> np.ndarray:
    """(N, *shape_m) per modality -> (N, sum_m prod(shape_m)) `dtype`, in the given order."""
    return np.concatenate([np.asarray(a, dtype).reshape(len(a), -1) for a in arrays], axis=1)


def uint8_columns(shapes: dict[str, Sequence[int]]) -> dict[str, Column]:
    """The stored layout of imported multimodal images (`data.casia`, `data.nyuv2`): one uint8
    column per modality with scale 1/255, `packed` uint8 with that same scale (so it decodes to
    exactly the concatenation of the decoded modalities, what the network takes), and `label`."""
    columns = {name: Column("uint8", list(shape), 1 / 255) for name, shape in shapes.items()}
    size = sum(int(np.prod(c.shape)) for c in columns.values())
    return {**columns, PACKED: Column("uint8", [size], 1 / 255), "label": Column("int64")}


def uint8_rows(arrays: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """A chunk of rows for `uint8_columns`: the modalities (N, C, H, W) uint8, packed, labels."""
    return {**arrays, PACKED: pack(list(arrays.values()), np.uint8), "label": labels.astype(np.int64)}


def multimodal_splits(modalities: dict[str, np.ndarray], labels: np.ndarray,
                      splits: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The platform's split dict for per-modality arrays (all rows) and row indices per split:
    one float32 column per modality, the `packed` column and `label`."""
    out = {}
    for split, rows in splits.items():
        cols = {name: np.ascontiguousarray(a[rows], dtype=np.float32) for name, a in modalities.items()}
        out[split] = {**cols, PACKED: pack(list(cols.values())), "label": labels[rows].astype(np.int64)}
    return out


def multimodal_meta(modalities: Sequence[str], num_classes: int, classes: Sequence[str] | None = None,
                    **provenance) -> dict:
    return {"num_classes": num_classes, "classes": list(classes or [str(c) for c in range(num_classes)]),
            "modalities": list(modalities), "packed_column": PACKED, **provenance}


# ----------------------------------------------------------------------------------------------
# digits_multimodal


def digit_views(images: np.ndarray) -> dict[str, np.ndarray]:
    """The three partial views of (N, 1, 8, 8) images in [0, 1] (see the module docstring)."""
    import kornia

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    coarse = torch.nn.functional.avg_pool2d(x, 2)                        # (N, 1, 4, 4)
    magnitude = kornia.filters.sobel(x)                                  # (N, 1, 8, 8)
    # Thresholding at each image's own median keeps where strokes change and drops how dark
    # they are, so this view cannot be turned back into the image.
    median = magnitude.flatten(1).median(dim=1).values[:, None, None, None]
    edges = (magnitude > median).float()
    profiles = torch.cat([x.mean(dim=3).flatten(1), x.mean(dim=2).flatten(1)], dim=1)   # (N, 16)
    return {"image": coarse.numpy(), "edges": edges.numpy(), "profiles": profiles.numpy()}


@register_dataset("digits_multimodal", aliases=("digits-multimodal",))
def digits_multimodal() -> dict:
    images, labels = load_digits()
    return {
        "splits": multimodal_splits(digit_views(images), labels, stratified_split(labels)),
        "meta": multimodal_meta(DIGITS_MODALITIES, 10, source="sklearn.datasets.load_digits",
                                split="stratified 60/20/20, seed 0",
                                construction="image: 2x2 mean-pooled 4x4; edges: kornia Sobel "
                                "magnitude > per-image median; profiles: 8 row means + 8 column means"),
    }


# ----------------------------------------------------------------------------------------------
# synthetic_multimodal


def make_synthetic_multimodal(informativeness: Sequence[float] = (0.9, 0.6, 0.2), n: int = 600,
                              dim: int = 8, seed: int = 0) -> dict:
    """A binary task with M = len(informativeness) vector modalities `m0`, `m1`, ... of size `dim`.

    Each row's label y is 0 or 1 (balanced). Modality m is `s_m * (2y - 1) * u_m + noise`, with a
    fixed unit direction u_m, unit Gaussian noise and signal strength s_m = 2 * informativeness[m].
    The Bayes accuracy of modality m alone is Phi(s_m): informativeness 0 is pure noise (0.5),
    0.5 gives 0.84, 1 gives 0.98. Split: stratified 60/20/20, fixed by `seed`.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    sign = (2 * labels - 1).astype(np.float32)[:, None]
    modalities = {}
    for m, info in enumerate(informativeness):
        direction = rng.standard_normal(dim).astype(np.float32)
        direction /= np.linalg.norm(direction)
        noise = rng.standard_normal((n, dim)).astype(np.float32)
        modalities[f"m{m}"] = 2.0 * float(info) * sign * direction + noise
    return {
        "splits": multimodal_splits(modalities, labels.astype(np.int64), stratified_split(labels, seed=seed)),
        "meta": multimodal_meta(list(modalities), 2, source="synthetic",
                                informativeness=[float(i) for i in informativeness], seed=seed),
    }


@register_dataset("synthetic_multimodal", aliases=("synthetic-multimodal",))
def synthetic_multimodal() -> dict:
    return make_synthetic_multimodal()
