"""Layers the architectures share.

`InputNormalization` is how a pretrained network's input convention travels with it: an
imported timm or torchvision backbone expects images in [0, 1] standardized with the mean/std
it was trained with, so those are architecture kwargs (`input_mean`, `input_std`) and the model
applies them itself, on the device, as its first operation. A spec rebuilt anywhere (a Ray
worker, `load_pretrained`, the exported MLflow model) therefore normalizes exactly as the
weights expect, and no data pipeline has to know which backbone it feeds.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """x (B, C, ...) -> (x - mean) / std per channel; the identity without a mean.

    The buffers are not persistent: they come from the spec's kwargs, so state dicts keep the
    keys of the source network and of models saved before the kwargs existed.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None) or (mean is not None and len(mean) != len(std)):
            raise ValueError(f"input_mean and input_std go together, one value per channel (got {mean}, {std})")
        if std is not None and min(std) <= 0:
            raise ValueError(f"input_std must be positive (got {std})")
        self.enabled = mean is not None
        if self.enabled:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)           # (B, C, H, W)

