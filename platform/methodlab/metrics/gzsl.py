"""Generalized zero-shot learning scores: per-class mean accuracy on seen (S) and unseen (U)
classes, their harmonic mean H, and conventional ZSL accuracy.

Xian, Lampert, Schiele, Akata, "Zero-Shot Learning — A Comprehensive Evaluation of the Good, the
Bad and the Ugly", TPAMI 2018, arXiv 1707.00600 (the protocol), as D3GZSL (AAAI 2024,
arXiv:2402.11424, official code github.com/PJBQ/D3GZSL) reports it. Everything is counted as sums first, so shards' counts add up to the whole split's:
reduce the counts over ranks, then score.
"""

from __future__ import annotations

import torch


def class_counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class of `labels`: rows with pred == label, and rows.

    Shape:
        pred (B,), labels (B,) -> (2, num_classes) float64.
    """
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    return torch.stack([correct, torch.bincount(labels, minlength=num_classes)]).double()


def per_class_accuracy(counts: torch.Tensor, classes: torch.Tensor | None = None) -> float:
    """Mean over the classes that have rows (and are in `classes`, if given) of the fraction of
    their rows predicted right; `counts` as `class_counts` gives them. 0 for an empty set.

    Shape:
        counts (2, C), classes (k,) -> float.
    """
    correct, rows = counts
    present = rows > 0
    if classes is not None:
        present &= torch.isin(torch.arange(len(rows), device=rows.device), classes)
    if not present.any():
        return 0.0
    return float((correct[present] / rows[present]).mean())


def harmonic_mean(s: float, u: float) -> float:
    """H = 2SU / (S + U), 0 when S + U = 0 (the GZSL summary)."""
    return 0.0 if s + u <= 0 else 2 * s * u / (s + u)


def gzsl_counts(logits: torch.Tensor, labels: torch.Tensor, unseen_classes: torch.Tensor) -> torch.Tensor:
    """Per class: rows right with the argmax over all classes, rows, and rows of unseen classes
    right with the argmax over the unseen classes only (ZSL).

    Shape:
        logits (B, C), labels (B,), unseen_classes (|U|,) -> (3, C) float64.
    """
    num_classes = logits.shape[1]
    unseen_rows = torch.isin(labels, unseen_classes)
    gzsl = class_counts(logits.argmax(1), labels, num_classes)
    zsl_pred = unseen_classes[logits[unseen_rows][:, unseen_classes].argmax(1)]
    zsl = class_counts(zsl_pred, labels[unseen_rows], num_classes)
    return torch.cat([gzsl, zsl[:1]])


def gzsl_scores(counts: torch.Tensor, unseen_classes: torch.Tensor) -> dict[str, float]:
    """S, U, H and ZSL from `gzsl_counts` (summed over shards): S over the rows of classes not in
    `unseen_classes`, U over the others, both with the argmax over all classes; ZSL is the
    per-class accuracy on the unseen rows with the argmax over the unseen classes only
    (conventional ZSL, no seen bias).

    Shape:
        counts (3, C), unseen_classes (|U|,) -> {"S", "U", "H", "ZSL"}.
    """
    num_classes = counts.shape[1]
    unseen = torch.isin(torch.arange(num_classes, device=counts.device), unseen_classes.to(counts.device))
    seen = torch.arange(num_classes, device=counts.device)[~unseen]
    s = per_class_accuracy(counts[:2], seen)
    u = per_class_accuracy(counts[:2], unseen_classes.to(counts.device))
    zsl = per_class_accuracy(torch.stack([counts[2], counts[1]]), unseen_classes.to(counts.device))
    return {"S": s, "U": u, "H": harmonic_mean(s, u), "ZSL": zsl}


def per_class_chart(counts: torch.Tensor, unseen_classes: torch.Tensor, classes: list[str], title: str):
    """Per-class GZSL accuracy (argmax over all classes), seen and unseen classes in two colours,
    with S, U and H in the title: the chart that shows which unseen classes transfer at all.

    Shape:
        counts (3, C) as `gzsl_counts` gives them (summed over shards), unseen_classes (|U|,).
    """
    from matplotlib.figure import Figure

    counts = counts.double().cpu()
    unseen = torch.isin(torch.arange(counts.shape[1]), unseen_classes.cpu())
    rate = (counts[0] / counts[1].clamp_min(1)).numpy()
    scores = gzsl_scores(counts, unseen_classes.cpu())
    fig = Figure(figsize=(max(6.0, 0.25 * len(classes) + 2), 3.8))
    ax = fig.add_subplot()
    for mask, label, colour in ((~unseen, "seen", "tab:blue"), (unseen, "unseen", "tab:orange")):
        idx = torch.nonzero(mask).flatten().numpy()
        ax.bar(idx, rate[idx], color=colour, label=label)
    if len(classes) <= 40:
        ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (GZSL)")
    ax.set_title(f"{title}: S {scores['S']:.3f}, U {scores['U']:.3f}, H {scores['H']:.3f}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
