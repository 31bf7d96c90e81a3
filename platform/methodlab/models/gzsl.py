"""GZSL feature classifier: what D3GZSL (and other generative GZSL methods) export.

Pre-extracted features (e.g. ResNet-101 pool5) -> the training-time min-max scaling -> an
embedding (Linear + ReLU) -> logits over all classes, seen and unseen, in original class-id order.
"""

from __future__ import annotations

import torch
from torch import nn

from methodlab.registry import register_model


@register_model("gzsl_classifier", aliases=("gzsl-classifier",),
                example={"kwargs": {"feature_dim": 6, "num_classes": 4, "embed_dim": 8}, "input": (2, 6)})
class GZSLClassifier(nn.Module):
    """x (B, feature_dim) -> logits (B, num_classes). `shift`/`scale` hold the min-max scaling fit
    on the training features (identity by default), so the model takes raw features. embed_dim=0:
    no embedding, a softmax classifier on the scaled features (f-CLSWGAN's final classifier)."""

    def __init__(self, feature_dim: int, num_classes: int, embed_dim: int = 2048):
        super().__init__()
        self.register_buffer("shift", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.embed = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.ReLU()) if embed_dim else nn.Identity()
        self.fc = nn.Linear(embed_dim or feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed((x - self.shift) * self.scale))
