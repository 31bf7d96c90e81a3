"""A small ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
arXiv 1512.03385) for 8x8 digits and larger images: the SSL encoder of `bad_batches` and a backbone
other methods can load.

Basic blocks (two 3x3 conv-BN, identity or 1x1 projection shortcut); stage i has `width * 2**i`
channels and stride 2 except the first. `stem_stride=1` keeps small images at full resolution
(the CIFAR-style stem); `stem_stride=2` plus a max-pool is the ImageNet stem for large images.
"""

from __future__ import annotations

import torch
from torch import nn

from methodlab.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet", example={"kwargs": {"width": 4, "blocks": [1, 1]}, "input": (2, 1, 8, 8)})
class ResNet(nn.Module):
    """stem -> len(blocks) stages of basic blocks -> global average pool -> `embed_dim` -> linear head.

    `embed(x)` returns the pooled features (B, embed_dim), embed_dim = width * 2**(len(blocks)-1),
    so that other methods can reuse the encoder as a backbone; `forward` returns logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 blocks: list[int] | tuple[int, ...] = (1, 1, 1), stem_stride: int = 1):
        super().__init__()
        stem = [nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True)]
        if stem_stride > 1:
            stem.append(nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.encoder = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed_dim = cin
        self.head = nn.Linear(cin, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)              # (B, C, H, W) -> (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))     # (B, num_classes)
