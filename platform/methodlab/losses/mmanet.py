"""MMANet's losses: margin-aware distillation (MAD) and modality-aware regularization (MAR).

Wei, Luo, Luo, "MMANet: Margin-aware Distillation and Modality-aware Regularization for
Incomplete Multimodal Learning", CVPR 2023, arXiv 2304.08028; official classification code
shicaiwei123/MMANet-CVPR2023, `classification/loss/kd/mad.py` (MAD) and
`classification/lib/model_develop.py::train_knowledge_distill_patch_feature_auxi_weak` (MAR).
Where the code departs from the paper the choice is an argument (`weighting`, `variant`; see
`methodlab.methods.mmanet`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 features under autocast are upcast (Gram matrices of them lose too much); float64 is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def entropy_weights(teacher_logits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """MAD's per-sample weights w_i = H_i / sum_j H_j.

    H_i = -sum_k p_ik log p_ik with p = softmax(z). The official code takes torch.log(p), which is
    -inf (and 0 * -inf = NaN) once a teacher probability underflows to 0; log_softmax stays finite
    for any finite logits, so H (and its gradient) is finite. `eps` added to every H_i keeps the
    weights defined (uniform) when every sample is saturated (all H_i = 0). Low margin -> high
    entropy -> high weight: samples near the teacher's decision boundary count more.

    Shape:
        teacher_logits (B, K) -> (B,), summing to 1.
    """
    z = _at_least_fp32(teacher_logits)
    entropy = -(z.softmax(dim=-1) * z.log_softmax(dim=-1)).sum(dim=-1) + eps
    return entropy / entropy.sum()


def mad_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, teacher_logits: torch.Tensor,
             weighting: Literal["column", "row"] = "column") -> torch.Tensor:
    """Margin-aware distillation (`classification/loss/kd/mad.py::MAD`): similarity-preserving
    KD (Tung & Mori, ICCV 2019) on the batch Gram matrices, weighted by teacher entropy.

    G = F F^T (B, B), each row divided by max(||row||_2, 1e-12); E_ij = (G~s_ij - G~t_ij)^2;
    `column`: sum_ij E_ij w_j, the classification code's value (the default): its
    `torch.sum(loss * H_teacher_prob)` broadcasts the (B,) weights against the last axis of the
    (B, B) error. `row`: sum_ij w_i E_ij, the axis of the segmentation code
    (`segmentation/loss/kd/mad.py`, `sum(loss, dim=1)` then times the weights), which reads as the
    paper's per-sample margin weighting. It is not that code's value: the segmentation code
    normalises the rows of each half of G's columns separately (a split it makes for memory on
    dense features); here every row is normalised whole, as in the classification code.
    A sum, not a mean, as in both codes. The teacher gets no gradient.

    Shape:
        student_feats (B, D_s), teacher_feats (B, D_t), teacher_logits (B, K) -> ().
    """
    f_s = _at_least_fp32(student_feats).flatten(1)
    f_t = _at_least_fp32(teacher_feats.detach()).flatten(1)
    g_s = F.normalize(f_s @ f_s.T, p=2, dim=1, eps=1e-12)
    g_t = F.normalize(f_t @ f_t.T, p=2, dim=1, eps=1e-12)
    error = (g_s - g_t).pow(2)                                              # (B, B)
    w = entropy_weights(teacher_logits.detach())
    weighted = error * (w[None, :] if weighting == "column" else w[:, None])
    return weighted.sum()


def mar_loss(aux_logits: torch.Tensor, labels: torch.Tensor, weak: torch.Tensor,
             variant: Literal["paper", "segmentation", "code"] = "paper") -> torch.Tensor:
    """Modality-aware regularization (paper Eq. 14; `classification/lib/model_develop.py::
    train_knowledge_distill_patch_feature_auxi_weak`, `segmentation/train_missing_mmanet.py`).

    aux_logits come from the regularization network; weak_i = 1 when sample i's modality
    combination is in the mined weak set W; n_W = sum_i weak_i. The three differ in the normaliser:
    `paper`: (1/B) sum_i weak_i CE_i, what the classification code writes
      (`torch.sum(x_loss_batch * weak_index) / p.shape[0]`, p.shape[0] = B) read with a (B,)
      indicator: the regularization network learns from weak samples only, and the term grows with
      the share of weak samples in the batch.
    `segmentation`: (1/n_W) sum_i weak_i CE_i, the segmentation code's: it selects the weak samples
      (`auxi_out[ii][index]`) and its `CrossEntropyLoss2d` averages over them (over their pixels,
      class-weighted, there), so the term is a mean CE whatever the share of weak samples.
    `code`: n_W * mean_i CE_i, the value of the classification code's broadcast
      sum((B,) * (B, 1, 1, 1)) / B: every sample, scaled by the number of weak ones.
    All are 0 when no sample in the batch is weak.

    Shape:
        aux_logits (B, K), labels (B,), weak (B,) 0/1 -> ().
    """
    ce = F.cross_entropy(aux_logits.float(), labels, reduction="none")    # (B,)
    weak = weak.to(ce.dtype)
    if variant == "paper":
        return (ce * weak).sum() / len(ce)
    if variant == "segmentation":
        return (ce * weak).sum() / weak.sum().clamp_min(1)
    return weak.sum() * ce.mean()
