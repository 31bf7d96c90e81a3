"""ACER, the average classification error rate of face anti-spoofing (ISO/IEC 30107-3), as MMANet
reports it on CASIA-SURF (Wei et al., CVPR 2023, arXiv 2304.08028; official code
shicaiwei123/MMANet-CVPR2023, `classification/`). Label 1 = real (bona fide), 0 = attack.
Counted as sums first, so shards' counts add up to the whole split's.
"""

from __future__ import annotations

import torch


def acer_counts(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sums for ACER: attacks (label 0) predicted real, attacks, reals (label 1) predicted attack,
    reals.

    Shape:
        preds (B,), labels (B,) -> (4,) float64.
    """
    attack, real = labels == 0, labels == 1
    return torch.stack([(preds[attack] != 0).sum(), attack.sum(), (preds[real] != 1).sum(), real.sum()]).double()


def acer_from_counts(counts: torch.Tensor) -> float:
    """(APCER + BPCER) / 2 with APCER the attack-as-real rate and BPCER the real-as-attack rate. A
    class absent from the labels contributes 0. In [0, 1]; 0.5 for a constant predictor when both
    classes occur.

    Shape:
        counts (4,) as `acer_counts` gives them (summed over shards) -> float.
    """
    wrong_attack, attacks, wrong_real, reals = counts.tolist()
    apcer = wrong_attack / attacks if attacks else 0.0
    bpcer = wrong_real / reals if reals else 0.0
    return (apcer + bpcer) / 2
