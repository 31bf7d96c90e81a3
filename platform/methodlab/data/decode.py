"""Stored values -> the values a method sees, on the device, after the copy.

Images are stored as uint8 (a quarter of float32's bytes on disk, in memory, in the object store
and over PCIe). A column with a `scale` in the manifest decodes as `raw.float() * scale` (digits:
counts 0..16, scale 1/16; image imports: 0..255, scale 1/255), exactly the float32 values the
float layout held. With `data.normalize=true` it is then standardized per channel with the
manifest's `mean`/`std` of the decoded train split. A column without a scale (labels, float
features, old float32 datasets) passes through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methodlab.data.dataset import Column


@dataclass(frozen=True)
class ColumnDecode:
    scale: float
    mean: tuple[float, ...] | None = None     # per channel (dim 1 of a batch), with normalize
    std: tuple[float, ...] | None = None

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32) * self.scale                          # (B, C, ...) float32
        if self.mean is not None:
            view = (1, -1) + (1,) * (x.dim() - 2)                       # broadcast over channels
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view)
            x = (x - mean) / std
        return x


Decoders = dict[str, ColumnDecode]


def column_decoders(columns: dict[str, Column], normalize: bool = False) -> Decoders:
    """The decode of every scaled column of a split or table."""
    return {name: ColumnDecode(col.scale, *((tuple(col.mean), tuple(col.std)) if normalize and col.mean else ()))
            for name, col in columns.items() if col.scale is not None}


def decode_batch(batch: dict[str, torch.Tensor], decoders: Decoders) -> dict[str, torch.Tensor]:
    return {k: decoders[k](v) if k in decoders else v for k, v in batch.items()}


def decode_arrays(arrays: dict[str, np.ndarray], columns: dict[str, Column], normalize: bool = False) -> dict[str, np.ndarray]:
    """Driver-side: numpy rows as stored -> decoded (model signatures, examples, tools)."""
    batch = decode_batch({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
                         column_decoders(columns, normalize))
    return {k: v.numpy() for k, v in batch.items()}
