"""NT-Xent, the contrastive loss of SimCLR, as Bad Batches trains with it.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv 2002.05709, eq. 1 (official code google-research/simclr
`objective.py::add_contrastive_loss`); the distributed form follows lightly's
`NTXentLoss(gather_distributed=True)`, lightly/loss/ntx_ent_loss.py. Used by Göksu & Pugeault,
IJCNN 2024, arXiv 2403.19579 (`methodlab.methods.bad_batches`). That paper also lists a Huber
loss among its index terms; its role could not be read (no official code), so no Huber term is
added here or in the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methodlab import distributed


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """The normalized temperature-scaled cross-entropy, averaged over the anchors.

    Row i of z1 and row i of z2 are the positive pair, every other row is a negative. With
    `gather` under a process group the candidates are the rows of all ranks: this rank's 2n
    anchors against 2N = 2n x world rows, through an all_gather that passes gradients back, so
    with DDP's gradient mean the loss and its gradient are those of one rank holding the global
    batch. In [log(1 + (2N-2) e^{-2/t}), log(1 + (2N-2) e^{2/t})].

    Shape:
        z1, z2 (n, D), the projections of the two views -> ().
    """
    n = z1.shape[0]
    rank, world = distributed.world() if gather else (0, 1)
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)                    # (2n, D)
    if world > 1:
        everyone = F.normalize(torch.cat([distributed.gather_rows(z1), distributed.gather_rows(z2)]).float(),
                               dim=1)                                          # (2N, D)
    else:
        everyone = local
    total = everyone.shape[0] // 2                                             # N
    own = torch.arange(n, device=local.device) + rank * n                       # this rank's rows in z1s
    sim = (local @ everyone.mT) / temperature                                  # (2n, 2N)
    self_index = torch.cat([own, own + total])
    sim[torch.arange(2 * n, device=local.device), self_index] = float("-inf")
    positives = torch.cat([own + total, own])
    return F.cross_entropy(sim, positives)
