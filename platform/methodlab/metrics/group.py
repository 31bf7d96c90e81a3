"""Accuracy under a group of image transformations and the invariance error, as learned
canonicalization is evaluated: every test image is transformed by every group element.

Panigrahi & Mondal, "Improved Canonicalization for Model Agnostic Equivariance", CVPR 2024
EquiVision workshop, arXiv 2405.14089; official code arnab39/equiadapt 0.1.2 (`GroupInference`,
test/group_acc). Counted as sums first, so shards' counts add up to the whole split's.
"""

from __future__ import annotations

import torch


def group_counts(preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sums: correct predictions per group element, images whose prediction is not the same under
    every element, and N. preds[n, g] is the predicted class of image n under element g.

    Shape:
        preds (N, G), labels (N,) -> (G + 2,) float64.
    """
    correct = (preds == labels[:, None]).double().sum(dim=0)                          # (G,)
    variant = (preds != preds[:, :1]).any(dim=1).double().sum()
    return torch.cat([correct, variant[None], torch.tensor([float(len(labels))], dtype=torch.float64,
                                                           device=correct.device)])


def group_accuracy_from_counts(counts: torch.Tensor, names: list[str], prefix: str) -> dict[str, float]:
    """Per-element accuracy `{prefix}_acc_{name}`, their mean `{prefix}_group_acc`, the identity
    accuracy `{prefix}_acc` and the invariance error `{prefix}_invariance_error`: the fraction of
    images whose prediction is not the same under every element.

    Shape:
        counts (G + 2,) as `group_counts` gives them (summed over shards), names G strings -> dict.
    """
    n = counts[-1].clamp_min(1)
    per = counts[:-2] / n                                                                # (G,)
    out = {f"{prefix}_acc_{name}": float(a) for name, a in zip(names, per)}
    out[f"{prefix}_acc"] = float(per[0])
    out[f"{prefix}_group_acc"] = float(per.mean())
    out[f"{prefix}_invariance_error"] = float(counts[-2] / n)
    return out


def group_chart(counts: torch.Tensor, names: list[str], title: str):
    """Test accuracy under each group element (a bar per rotation/reflection), with the
    invariance error in the title: an invariant model's bars are level. A matplotlib Figure.

    Shape:
        counts (G + 2,) as `group_counts` gives them (summed over shards), names G strings.
    """
    from matplotlib.figure import Figure

    counts = counts.double().cpu()
    per = (counts[:-2] / counts[-1].clamp_min(1)).numpy()
    fig = Figure(figsize=(max(4.5, 0.6 * len(names) + 2), 3.5))
    ax = fig.add_subplot()
    ax.bar(range(len(names)), per, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title} (invariance error {float(counts[-2] / counts[-1].clamp_min(1)):.3f})")
    fig.tight_layout()
    return fig
