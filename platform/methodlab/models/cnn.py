"""A small convolutional classifier: the supervised baseline's network for 8x8 digits and up."""

from __future__ import annotations

import torch
from torch import nn

from methodlab.registry import register_model


@register_model("cnn", example={"kwargs": {"width": 4, "embed_dim": 8}, "input": (2, 1, 8, 8)})
class SmallCNN(nn.Module):
    """conv-bn-relu x2, pool, conv-bn-relu, global pool -> `embed_dim` features -> linear head.

    `embed(x)` returns the features, so other methods can reuse the trained encoder as a backbone.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, embed_dim: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, embed_dim, 3, padding=1), nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)              # (B, C, H, W) -> (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))     # (B, num_classes)
