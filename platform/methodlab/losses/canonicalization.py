"""Learned canonicalization's losses: the canonicalization prior, the group contrast loss and the
artifact-consistency term.

Panigrahi & Mondal, "Improved Canonicalization for Model Agnostic Equivariance", CVPR 2024
EquiVision workshop, arXiv 2405.14089, and Mondal et al., "Equivariant Adaptation of Large
Pretrained Models", NeurIPS 2023, arXiv 2310.01647; official code arnab39/equiadapt 0.1.2,
`equiadapt/images/canonicalization/discrete_group.py` (`OptimizedGroupEquivariantImageCanonicalization`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methodlab.models.canonicalizer import rotate_interpolated


def prior_loss(scores: torch.Tensor) -> torch.Tensor:
    """Canonicalization prior of Mondal et al.: CE of the group scores against index 0, the
    identity, so that upright training images stay upright, which is what a predictor trained on
    upright data needs. With cosine scores in [-1, 1] it is bounded below by log(1 + (|G|-1)e^-2).

    Shape:
        scores (B, G) -> ().
    """
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def group_contrast_loss(vectors: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Group contrast loss of Panigrahi & Mondal (equiadapt `get_optimization_specific_loss`): for
    the vectors of the copies of each image, mean over all B·G² entries of |V_b V_bᵀ| with the
    diagonal zeroed. It pushes the copies of one image apart so that a unique copy can win the
    argmax. `normalized=False` (the official code) uses raw dot products, which φ can also lower by
    shrinking ‖v‖; `normalized=True` uses cosines. >= 0, and invariant to the order of the group
    elements.

    Shape:
        vectors (B, G, D) -> ().
    """
    v = F.normalize(vectors, dim=-1) if normalized else vectors
    gram = v @ v.transpose(1, 2)                                          # (B, G, G)
    off = 1.0 - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return (gram.abs() * off).mean()


def artifact_consistency_loss(phi: nn.Module, images: torch.Tensor, angles: torch.Tensor,
                              pad_ratio: float) -> torch.Tensor:
    """Artifact term of equiadapt (Panigrahi & Mondal 2024): MSE(φ(R_θ⁻¹ R_θ x), φ(x)), so that φ
    ignores the interpolation and cropping artifacts of non-90-degree rotations (C8). Zero for
    exact rotations.

    Shape:
        images (N, C, H, W), angles (N,) in degrees -> ().
    """
    round_trip = rotate_interpolated(rotate_interpolated(images, angles, pad_ratio), -angles, pad_ratio)
    return F.mse_loss(phi(round_trip), phi(images))
