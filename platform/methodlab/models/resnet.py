"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385),
from a small network for 8x8 digits to ResNet-18/50 with torchvision's layout: the SSL encoder of
`bad_batches` and a backbone other methods load (`methodlab models import --from
torchvision:resnet50` converts a torchvision or timm state dict into it).

Stage i has `width * 2**i` channels (times 4 out of a bottleneck) and stride 2 except the first.
`block="basic"`: two 3x3 conv-BN (ResNet-18/34); `"bottleneck"`: 1x1 reduce, 3x3 with the
stride, 1x1 expand x4 (ResNet-50/101; the stride on the 3x3 as torchvision and timm do, "v1.5").
Shortcuts are the identity or a 1x1 conv-BN projection. The stem is one `stem_kernel` conv with
stride `stem_stride`, BN, ReLU, plus a 3x3/2 max-pool when strided: `stem_stride=1` keeps small
images at full resolution (the CIFAR-style stem); `stem_kernel=7, stem_stride=2` is ImageNet's.

    ResNet(in_channels=1, num_classes=10, width=32, blocks=(1, 1, 1))                 # digits
    ResNet(3, 1000, 64, (2, 2, 2, 2), stem_stride=2, stem_kernel=7)                   # ResNet-18
    ResNet(3, 1000, 64, (3, 4, 6, 3), stem_stride=2, stem_kernel=7, block="bottleneck")  # ResNet-50
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from methodlab.models.layers import InputNormalization
from methodlab.registry import register_model


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@register_model("resnet", example={"kwargs": {"width": 4, "blocks": [1, 1]}, "input": (2, 1, 8, 8)})
class ResNet(nn.Module):
    """stem -> len(blocks) stages -> global average pool -> `embed_dim` -> linear head.

    `embed(x)` returns the pooled features (B, embed_dim), embed_dim = width * 2**(len(blocks)-1)
    (x4 with bottlenecks), so that other methods can reuse the encoder as a backbone; `forward`
    returns logits (the features with `num_classes=0`, a headless backbone). `encoder` is one Sequential (stem, blocks in order, pool, flatten): the
    importer maps torchvision's `layer{i}.{j}` onto its flat indices.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 blocks: Sequence[int] = (1, 1, 1), stem_stride: int = 1, stem_kernel: int = 3,
                 block: Literal["basic", "bottleneck"] = "basic",
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)} (got {block!r})")
        unit = BLOCKS[block]
        self.normalize = InputNormalization(input_mean, input_std)
        stem = [nn.Conv2d(in_channels, width, stem_kernel, stem_stride, stem_kernel // 2, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if stem_stride > 1:
            stem.append(nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            for j in range(n):
                layers.append(unit(cin, width * 2 ** i, 2 if (i > 0 and j == 0) else 1))
                cin = width * 2 ** i * unit.expansion
        self.encoder = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed_dim = cin
        self.head = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))      # (B, C, H, W) -> (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))             # (B, num_classes)
