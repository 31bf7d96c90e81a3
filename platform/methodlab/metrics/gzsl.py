"""Generalized zero-shot learning scores: per-class mean accuracy on seen (S) and unseen (U)
classes, their harmonic mean H, and conventional ZSL accuracy.

Xian, Lampert, Schiele, Akata, "Zero-Shot Learning — A Comprehensive Evaluation of the Good, the
Bad and the Ugly", TPAMI 2018, arXiv 1707.00600 (the protocol), as D3GZSL (AAAI 2024,
arXiv:2402.11424, official code github.com/PJBQ/D3GZSL) reports it. Everything is counted as sums first, so shards' counts add up to the whole split's:
reduce the counts over ranks, then score.
"""

from __future__ import annotations

import numpy as np
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


def calibrated(logits: torch.Tensor, seen_classes: torch.Tensor, gamma: float) -> torch.Tensor:
    """Calibrated stacking (Chao, Changpinyo, Gong, Sha, "An Empirical Study and Analysis of
    Generalized Zero-Shot Learning for Object Recognition in the Wild", ECCV 2016, arXiv
    1605.04253, "calibrated stacking"): gamma subtracted from the seen classes' scores, so that a classifier
    trained on real seen and synthetic unseen features stops preferring the seen classes it saw
    real rows of. gamma = 0 is the plain argmax; a gamma above every row's seen-unseen score gap
    predicts an unseen class for every row. The paper's gamma is any real number (its AUSUC
    sweeps it from -inf to +inf): a negative one favours the seen classes, for a classifier
    biased the other way (f-CLSWGAN's softmax on 38-d shapes_gzsl features, with 100 synthetic
    rows per unseen class against 40 real per seen one, measured S 0.007 at gamma 0 and 0.83 at
    the val-chosen -1.5). Logits or log-probabilities give the same argmax.

    Shape:
        logits (B, C), seen_classes (|S|,) -> (B, C).
    """
    shift = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    shift[seen_classes.to(logits.device)] = gamma
    return logits - shift


# The candidates `calibration_gamma=val` chooses from: 0, then +-g for 80 log-spaced g in
# [0.01, 100] (score gaps of log-softmax outputs, ~0 to a few tens), ordered by |gamma| with the
# positive one first, so that `best_gamma`'s first maximum is the smallest change to the argmax.
# A fixed grid, not one from the data, so that every rank of a sharded evaluation scores the same
# candidates and their counts add up.
_MAGNITUDES = torch.logspace(-2, 2, 80, dtype=torch.float64)
GAMMA_GRID = torch.cat([torch.zeros(1, dtype=torch.float64), torch.stack([_MAGNITUDES, -_MAGNITUDES], 1).flatten()])


def calibration_counts(logits: torch.Tensor, labels: torch.Tensor, unseen_classes: torch.Tensor,
                       seen_classes: torch.Tensor, grid: torch.Tensor = GAMMA_GRID) -> torch.Tensor:
    """`gzsl_counts` of the calibrated logits for every gamma of `grid` (summable over shards);
    `best_gamma` picks from them.

    Shape:
        logits (B, C), labels (B,), unseen_classes (|U|,), seen_classes (|S|,), grid (G,) -> (G, 3, C).
    """
    return torch.stack([gzsl_counts(calibrated(logits, seen_classes, float(g)), labels, unseen_classes)
                        for g in grid])


def best_gamma(counts: torch.Tensor, unseen_classes: torch.Tensor, grid: torch.Tensor = GAMMA_GRID) -> float:
    """The gamma of `grid` with the highest H, the first in the grid's order on ties (GAMMA_GRID's
    order is by |gamma|, so an evaluation that gains nothing from calibration keeps gamma = 0).

    Shape:
        counts (G, 3, C) from `calibration_counts` -> float.
    """
    hs = torch.tensor([gzsl_scores(c, unseen_classes)["H"] for c in counts])
    return float(grid[int(torch.nonzero(hs == hs.max())[0])])


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


def attribute_precondition(attributes: np.ndarray, features: np.ndarray, labels: np.ndarray,
                           seen_classes: np.ndarray) -> dict[str, float]:
    """Whether the side information can carry zero-shot transfer at all, before any model runs:

    spearman     Spearman rank correlation between the pairwise Euclidean distances of the class
                 attribute vectors and those of the class-mean features, over the classes with
                 rows in `labels` (each unordered pair once). Near 0: classes that look alike in
                 attribute space are not alike in feature space, and no attribute-conditioned
                 generator can place an unseen class where its features are.
    seen_rank    the rank of the seen classes' attribute rows; equal to attribute_dim when every
                 attribute direction varies over the seen classes (full column rank), so that an
                 unseen class's attribute vector is a combination of seen ones and nothing the
                 generator reads about it is a direction it never trained on.

    Shape:
        attributes (C, A), features (N, d), labels (N,), seen_classes (k,) ->
        {"spearman", "seen_rank", "attribute_dim"}.
    """
    from scipy.stats import rankdata

    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])          # (C', d)
    i, j = np.triu_indices(len(classes), 1)

    def pair_distances(x: np.ndarray) -> np.ndarray:                             # (C', k) -> (C'(C'-1)/2,)
        return np.linalg.norm(x[i] - x[j], axis=1)

    ra, rf = rankdata(pair_distances(attributes[classes])), rankdata(pair_distances(means))
    ra, rf = ra - ra.mean(), rf - rf.mean()
    denom = np.sqrt((ra ** 2).sum() * (rf ** 2).sum())
    rho = float((ra * rf).sum() / denom) if denom > 0 else 0.0
    return {"spearman": rho, "seen_rank": int(np.linalg.matrix_rank(attributes[np.asarray(seen_classes)])),
            "attribute_dim": int(attributes.shape[1])}
