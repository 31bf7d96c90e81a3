"""The Fréchet distance between two Gaussians fitted to feature sets, exact and fast, in torch.

    FD = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

Dowson & Landau, "The Fréchet distance between multivariate normal distributions", J. Multivariate
Analysis 12(3), 1982; used as FID by Heusel et al., NeurIPS 2017, arXiv 1706.08500, and as FRD
(on ResNet features) by Göksu & Pugeault, IJCNN 2024, arXiv 2403.19579. The reference
implementation (mseitzer/pytorch-fid `calculate_frechet_distance`) takes `scipy.linalg.sqrtm` of
the d x d product S1 S2 and retries with eps*I when that fails; this module never forms a d x d
matrix square root and needs no eps:

* features on both sides, n = max(n1, n2) <= d (the usual case: a batch of wide features):
  with centred rows A (n1 x d), B (n2 x d), S1 S2 = A^T A B^T B / ((n1-1)(n2-1)) has the same
  non-zero eigenvalues as (A B^T)(A B^T)^T, so Tr((S1 S2)^{1/2}) = ||A B^T||_* / sqrt((n1-1)(n2-1)):
  the singular values of an n1 x n2 matrix, O(n1 n2 d).
* features on one side, statistics (mu, Sigma) on the other (a running reference), n1 <= d:
  Tr((S1 S2)^{1/2}) = sum sqrt(eig(A S2 A^T)) / sqrt(n1-1), an n1 x n1 symmetric eigenproblem.
* otherwise: S1 = U L U^T (eigh), F = U L^{1/2}; S1 S2 is similar to F^T S2 F, which is symmetric
  PSD, so Tr((S1 S2)^{1/2}) = sum sqrt(eigvalsh(F^T S2 F)). Two d x d eigh, no sqrtm.

Everything is accumulated in float64 and eigenvalues are clamped at 0 before the square root
(they are >= 0 in exact arithmetic). Covariances divide by n-1, as `np.cov` does. Round-off: the
nuclear route is accurate to ~1e-14 relative; the eigen routes take square roots of eigenvalues,
so a rank-deficient covariance (eigenvalues that are 0 up to round-off, ~1e-16) contributes up to
~sqrt(1e-16) = 1e-8 relative. The result is not clamped, so FD(X, X) can be that small and negative.
The functions run under `torch.no_grad()`: the distance is a score, never a loss.
"""

from __future__ import annotations

import torch

Stats = tuple[torch.Tensor, torch.Tensor]        # (mu (d,), Sigma (d, d)), float64


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    mu = x.mean(0)
    return mu, x - mu


def _sqrt_eig_sum(sym: torch.Tensor) -> torch.Tensor:
    """sum_i sqrt(max(lambda_i, 0)) of a symmetric PSD matrix (symmetrised against round-off)."""
    return torch.linalg.eigvalsh((sym + sym.mT) / 2).clamp_min(0).sqrt().sum()


@torch.no_grad()
def feature_stats(x: torch.Tensor) -> Stats:
    """(mu, Sigma) in float64 of features x (n, d); Sigma divides by n-1 (np.cov)."""
    mu, a = _centred(x)
    return mu, a.mT @ a / (x.shape[0] - 1)


@torch.no_grad()
def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 (d, d), by the eigen route (float64 scalar)."""
    s1, s2 = s1.to(torch.float64), s2.to(torch.float64)
    lam, u = torch.linalg.eigh((s1 + s1.mT) / 2)
    f = u * lam.clamp_min(0).sqrt()               # S1 = F F^T
    return _sqrt_eig_sum(f.mT @ s2 @ f)


@torch.no_grad()
def frechet_distance(x: torch.Tensor | Stats, y: torch.Tensor | Stats) -> torch.Tensor:
    """FD between x and y, each either features (n, d) or precomputed `feature_stats` (mu, Sigma).

    Returns a float64 scalar tensor on the inputs' device. n1 and n2 may differ.
    """
    if isinstance(x, tuple) and not isinstance(y, tuple):   # FD is symmetric: features first
        x, y = y, x
    if isinstance(x, tuple):                      # statistics on both sides
        (mu1, s1), (mu2, s2) = [(m.to(torch.float64), s.to(torch.float64)) for m, s in (x, y)]
        return _combine(mu1, mu2, torch.diagonal(s1).sum(), torch.diagonal(s2).sum(),
                        trace_sqrt_product(s1, s2))
    mu1, a = _centred(x)
    n1, d = a.shape
    tr1 = a.square().sum() / (n1 - 1)
    if isinstance(y, tuple):                      # features vs a (running) reference
        mu2, s2 = y[0].to(torch.float64), y[1].to(torch.float64)
        cross = (_sqrt_eig_sum(a @ s2 @ a.mT) / (n1 - 1) ** 0.5 if n1 <= d
                 else trace_sqrt_product(a.mT @ a / (n1 - 1), s2))
        return _combine(mu1, mu2, tr1, torch.diagonal(s2).sum(), cross)
    mu2, b = _centred(y)
    n2 = b.shape[0]
    tr2 = b.square().sum() / (n2 - 1)
    if max(n1, n2) <= d:
        cross = torch.linalg.svdvals(a @ b.mT).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    else:
        cross = trace_sqrt_product(a.mT @ a / (n1 - 1), b.mT @ b / (n2 - 1))
    return _combine(mu1, mu2, tr1, tr2, cross)


def _combine(mu1, mu2, tr1, tr2, cross) -> torch.Tensor:
    return (mu1 - mu2).square().sum() + tr1 + tr2 - 2 * cross
