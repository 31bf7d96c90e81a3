"""TOAST's variational (reconstruction) loss of the top-down feedback path.

Shi, Gai, Darrell, Wang, "TOAST: Transfer Learning via Attention Steering", arXiv 2305.15542
(official code bfshi/TOAST, `visual_classification/src/models/vit/vit_top_down.py`, `var_loss`),
and its predecessor AbSViT (Shi, Darrell, Wang, CVPR 2023, arXiv 2303.15056; bfshi/AbSViT
`models/absvit.py`, `var_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def variational_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L_var = sum_l MSE(W1_l out_l, in_l): each decoder's first map W1_l must send block l's
    pass-2 output back to its input, which makes the feedback path approximately invert the
    feedforward one. out_l and in_l come detached, so only W1 gets gradient. >= 0, zero exactly
    when every W1_l out_l = in_l.

    Shape:
        pairs: L tuples (W1_l out_l, in_l), each (B, N, C) -> ().
    """
    return sum(F.mse_loss(recon, target) for recon, target in pairs)
