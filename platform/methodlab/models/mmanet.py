"""The MMANet networks for M modalities of any shape (Wei et al., "MMANet: Margin-aware
Distillation and Modality-aware Regularization for Incomplete Multimodal Learning", CVPR 2023,
arXiv 2304.08028; official code `shicaiwei123/MMANet-CVPR2023`, `classification/models/surf_baseline.py`).

The official classification network has one ResNet-18 stem per modality, multiplies each stem's
features by the sample's 0/1 modality mask, concatenates them and runs a shared trunk (layer3,
layer4, pool) and head; the regularization network `auxi_bone` is a *separate* trunk and head on
the same masked features, used in training only. This module keeps that structure at the scale of
small inputs: a conv stem for image-like modalities (C, H, W), an MLP stem for vectors, an MLP
trunk whose output plays the part of the layer4 features that MAD distils.

One class serves as teacher (no regularizer), student (with it) and exported deployment network
(without it). Its input is the single `packed` tensor (B, sum of modality sizes) of
`methodlab.data.multimodal`, so an exported model takes one tensor: a modality whose whole slice
is NaN is missing for that sample (its features are zeroed exactly as in training).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from methodlab.registry import register_model


def _stem(shape: Sequence[int], width: int, feat_dim: int) -> nn.Module:
    """(B, prod(shape)) -> (B, feat_dim). Image-like modalities, (C, H, W) or (H, W), get
    conv-bn-relu x2 and a linear map of the whole map (small inputs keep their layout, unlike a
    global pool); any other shape is a vector and gets an MLP."""
    if len(shape) in (2, 3):
        image_shape = tuple(shape) if len(shape) == 3 else (1, *shape)
        channels, spatial = image_shape[0], math.prod(image_shape[1:])
        return nn.Sequential(
            nn.Unflatten(1, image_shape),
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(width * spatial, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Linear(math.prod(shape), 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU(inplace=True),
        nn.Linear(2 * width, feat_dim), nn.BatchNorm1d(feat_dim), nn.ReLU(inplace=True))


def _trunk(in_dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))


class _Branch(nn.Module):
    """A trunk and its head: fused features (B, M * feat_dim) -> (features (B, hidden), logits)."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.trunk = _trunk(in_dim, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(fused)
        return feats, self.head(feats)


@register_model("mmanet", example={"kwargs": {"modality_shapes": [[1, 4, 4], [5]], "num_classes": 3, "width": 4,
                                            "feat_dim": 4, "hidden": 8, "regularizer": True}, "input": (2, 21)})
class MultimodalNet(nn.Module):
    """Modality stems -> feature-level masking -> concatenation -> trunk -> head.

    `forward(packed)` returns logits (B, num_classes); missing modalities are NaN slices.
    `forward(packed, mask, with_aux=True)` (training) returns (logits, trunk features (B, hidden),
    regularization-network logits or None); `mask` is (B, M) with 0/1 entries.
    """

    def __init__(self, modality_shapes: Sequence[Sequence[int]], num_classes: int, width: int = 32,
                 feat_dim: int = 64, hidden: int = 128, regularizer: bool = False):
        super().__init__()
        self.shapes = [tuple(int(d) for d in s) for s in modality_shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.stems = nn.ModuleList(_stem(s, width, feat_dim) for s in self.shapes)
        self.deploy = _Branch(len(self.shapes) * feat_dim, hidden, num_classes)
        # The regularization network sees the same masked features through its own trunk, so its
        # loss shapes the stems without touching the deployment trunk and head.
        self.regularizer = _Branch(len(self.shapes) * feat_dim, hidden, num_classes) if regularizer else None

    @property
    def num_modalities(self) -> int:
        return len(self.shapes)

    def present(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, M) float mask: 1 where a modality's slice is not entirely NaN."""
        parts = torch.split(packed, self.sizes, dim=1)
        return torch.stack([~torch.isnan(p).all(dim=1) for p in parts], dim=1).to(packed.dtype)

    def fused(self, packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, M * feat_dim): each modality's stem features times its mask entry (dropped = 0)."""
        parts = torch.split(torch.nan_to_num(packed, nan=0.0), self.sizes, dim=1)
        feats = [stem(p) * mask[:, m:m + 1] for m, (stem, p) in enumerate(zip(self.stems, parts))]
        return torch.cat(feats, dim=1)

    def forward(self, packed: torch.Tensor, mask: torch.Tensor | None = None, with_aux: bool = False):
        if mask is None:
            mask = self.present(packed)
        fused = self.fused(packed, mask)
        feats, logits = self.deploy(fused)
        if not with_aux:
            return logits
        aux = self.regularizer(fused)[1] if self.regularizer is not None else None
        return logits, feats, aux
