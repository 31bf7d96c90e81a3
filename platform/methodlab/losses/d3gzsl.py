"""D3GZSL's losses: the WGAN-GP critic terms of its f-CLSWGAN backbone, in-distribution dual-space
distillation (ID2SD: label-space KL, embedding-space batch BCE) and out-of-distribution batch
distillation (O2DBD).

Wang, Hong, Huangfu, Huang, "Data Distribution Distilled Generative Model for Generalized Zero-Shot
Recognition", AAAI 2024, arXiv:2402.11424; official code github.com/PJBQ/D3GZSL, `gzsl/util.py::
calc_ood_loss` (the paper's equations were not available: every formula follows the code). The
critic follows Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017,
arXiv:1704.00028, as f-CLSWGAN (Xian et al., CVPR 2018, arXiv:1712.00981) uses it.

`variant`: faithful = the official code (double softmax, BCE-with-logits on similarities already
in [0, 1]); clean = the corrected form (see `methodlab.methods.d3gzsl`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["faithful", "clean"]


def critic_terms(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, att: torch.Tensor,
                 alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WGAN-GP critic pieces: D(real), D(fake) and the gradient penalty
    E[(||grad_x^ D(x^, a)||_2 - 1)^2] >= 0 at x^ = alpha real + (1 - alpha) fake. One critic call
    on the concatenation: a DDP-wrapped critic then runs one forward per backward.

    Shape:
        real, fake (B, d); att (B, A); alpha (B, 1) -> D(real) (B,), D(fake) (B,), penalty ().
    """
    fake = fake.detach()
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    b = len(real)
    scores = critic(torch.cat([real, fake, x_hat]), att.repeat(3, 1)).reshape(-1)
    (grad,) = torch.autograd.grad(scores[2 * b:].sum(), x_hat, create_graph=True)
    gp = ((grad.norm(2, dim=1) - 1) ** 2).mean()
    return scores[:b], scores[b:2 * b], gp


def same_class(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float targets 1[a_i == b_j].

    Shape:
        a (n,), b (m,) -> (n, m).
    """
    return (a[:, None] == b[None, :]).float()


def pair_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """All-pairs cosine by one matrix product of row-normalised inputs; the official
    `batch_embed_distillation` builds B^2 x d repeats instead (~0.5 GB at B=256, d=2048).

    Shape:
        u (n, d), v (m, d) -> (n, m).
    """
    return F.normalize(u, dim=1) @ F.normalize(v, dim=1).T


def pair_bce(u: torch.Tensor, v: torch.Tensor, target: torch.Tensor, variant: Variant, kappa: float) -> torch.Tensor:
    """Mean over all (i, j) of BCE-with-logits(l_ij, target_ij). faithful: l = (cos + 1) / 2 in
    [0, 1], so every term lies in [softplus(-1), softplus(1)] = [0.3133, 1.3133] and never reaches 0;
    clean: l = kappa cos, terms in [softplus(-kappa), softplus(kappa)].

    Shape:
        u (n, d), v (m, d), target (n, m) -> ().
    """
    cos = pair_cosine(u, v)
    logits = (cos + 1) / 2 if variant == "faithful" else kappa * cos
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def kl_distillation(teacher_logits: torch.Tensor, student_seen_logits: torch.Tensor, variant: Variant,
                    temperature: float = 1.0) -> torch.Tensor:
    """ID2SD label space, L_kl (batchmean); the student's seen-class columns come in the teacher's
    (sorted seen) order. faithful: KL(softmax(p~) || softmax(q)) with p~ = softmax(teacher),
    q = softmax(student) (double softmax, `KLDivLoss(log_softmax(q), softmax(p~))`); clean:
    T^2 KL(softmax(v~/T) || softmax(v^/T)).

    Shape:
        teacher_logits (B, |S|), student_seen_logits (B, |S|) -> ().
    """
    if variant == "faithful":
        p, q = teacher_logits.softmax(1), student_seen_logits.softmax(1)
        return F.kl_div(q.log_softmax(1), p.softmax(1), reduction="batchmean")
    t = temperature
    return F.kl_div((student_seen_logits / t).log_softmax(1), (teacher_logits / t).softmax(1),
                    reduction="batchmean") * t * t


def embedding_distillation(teacher_emb: torch.Tensor, student_emb: torch.Tensor, labels: torch.Tensor,
                           variant: Variant, kappa: float) -> torch.Tensor:
    """ID2SD embedding space, L_be: (1/B^2) sum_ij BCE(sim(z~_i, z^_j), 1[y_i = y_j]) on real seen
    rows. The diagonal is included.

    Shape:
        teacher_emb (B, e), student_emb (B, e), labels (B,) -> ().
    """
    return pair_bce(teacher_emb, student_emb, same_class(labels, labels), variant, kappa)


def teacher_confidence(teacher_logits: torch.Tensor, sigmoid: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """s~ = max_c log softmax(v~)_c in [-log|S|, 0] (the code's `energy_score`, a max log-prob,
    not an energy) and h~ = [sigma(w(s~ + b)), 1 - sigma(w(s~ + b))], `sigmoid` being the learnable
    sigma(w (s + b)) (`methodlab.models.d3gzsl.LearnSigmoid`).

    Shape:
        teacher_logits (B, |S|) -> s~ (B,), h~ (B, 2).
    """
    score = teacher_logits.log_softmax(1).max(1).values
    p = sigmoid(score)
    return score, torch.stack([p, 1 - p], 1)


def ood_distillation(student_ood: torch.Tensor, teacher_conf: torch.Tensor, labels: torch.Tensor,
                     variant: Variant, kappa: float) -> torch.Tensor:
    """O2DBD, L_od: (1/|X|^2) sum_ij BCE(sim(softmax(h^_i), h~'_j), 1[y_i = y_j]) over synthetic
    unseen + real seen rows; h^ are the student's fc2 outputs, h~ the teacher confidence
    (faithful: softmaxed again, h~' = softmax(h~); clean: h~' = h~). The target is class identity,
    as in the code, not ID/OOD identity.

    Shape:
        student_ood (B, 2), teacher_conf (B, 2), labels (B,) -> ().
    """
    t = teacher_conf.softmax(1) if variant == "faithful" else teacher_conf
    return pair_bce(student_ood.softmax(1), t, same_class(labels, labels), variant, kappa)
