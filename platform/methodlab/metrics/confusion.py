"""The confusion matrix as counts, so every rank's shard adds up to the whole split's
(`distributed.all_sum`), and its chart: the diagnostic a classifier run logs."""

from __future__ import annotations

from typing import Sequence

import torch


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[i, j] = images of class i predicted as j.

    Shape:
        preds (N,), labels (N,) int64 in [0, num_classes) -> (num_classes, num_classes) float64.
    """
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()


def confusion_chart(counts: torch.Tensor, classes: Sequence[str], title: str):
    """The row-normalized matrix (each true class sums to 1) as a matplotlib Figure, with the
    accuracy in the title."""
    from matplotlib.figure import Figure

    counts = counts.double().cpu()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(classes)
    fig = Figure(figsize=(max(4.0, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    if k <= 30:                      # beyond that the tick labels overlap; the colours still read
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(counts.diagonal().sum() / counts.sum().clamp_min(1))
    ax.set_title(f"{title} (accuracy {accuracy:.3f})")
    fig.tight_layout()
    return fig
