"""D3GZSL's networks (official code github.com/PJBQ/D3GZSL, `gzsl/model.py`, on the f-CLSWGAN
backbone of Xian et al., CVPR 2018, arXiv:1712.00981).

Wang, Hong, Huangfu, Huang, "Data Distribution Distilled Generative Model for Generalized Zero-Shot
Recognition", AAAI 2024, arXiv:2402.11424:
  generator G(z, a) and critic D(x, a)         f-CLSWGAN's WGAN-GP (Gulrajani et al., arXiv:1704.00028)
  teacher E_o + C_o                             trained on seen classes, then frozen
  student E_s + fc1 (|C|-way) + fc2 (2-d)       the GZSL classifier; fc2 is the low-dimensional OOD head
  learnable sigmoid sigma(w (s + b))            turns the teacher's max log-prob into [ID, OOD] confidence
They are training-time networks (`methodlab.methods.d3gzsl` builds them from its config); what is
exported is the student as a `gzsl_classifier` (`methodlab.models.gzsl`).
"""

from __future__ import annotations

import torch
from torch import nn

from methodlab.models.gzsl import GZSLClassifier


def weights_init(module: nn.Module) -> None:
    """The code's `weights_init`: Linear weights N(0, 0.02), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """G(z, a) = ReLU(W2 LeakyReLU_0.2(W1 [z; a])): (B, nz), (B, A) -> (B, d), non-negative."""

    def __init__(self, noise_dim: int, att_dim: int, hidden: int, feature_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(noise_dim + att_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, feature_dim), nn.ReLU())
        self.noise_dim = noise_dim
        self.apply(weights_init)

    def forward(self, z: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, att], 1))


class Critic(nn.Module):
    """D(x, a) = W2 LeakyReLU_0.2(W1 [x; a]): (B, d), (B, A) -> (B, 1)."""

    def __init__(self, feature_dim: int, att_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + att_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.apply(weights_init)

    def forward(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, att], 1))


class Teacher(nn.Module):
    """E_o (Linear + ReLU) and C_o (Linear to |S|): x -> (z~ (B, e), seen logits v~ (B, |S|))."""

    def __init__(self, feature_dim: int, embed_dim: int, num_seen: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.ReLU())
        self.head = nn.Linear(embed_dim, num_seen)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)


class Student(nn.Module):
    """E_s + F_MLP: x -> (z^ (B, e), v^ (B, C) logits over all classes in class-id order,
    h^ = fc2(log_softmax(v^)) (B, 2), the low-dimensional OOD representation). E_s gets the code's
    N(0, 0.02) init, fc1/fc2 keep PyTorch's default (the code never re-inits F_MLP)."""

    def __init__(self, feature_dim: int, embed_dim: int, num_classes: int):
        super().__init__()
        self.net = GZSLClassifier(feature_dim, num_classes, embed_dim)   # embed = E_s, fc = fc1
        self.net.embed.apply(weights_init)
        self.ood = nn.Linear(num_classes, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.net.embed(x)
        logits = self.net.fc(z)
        return z, logits, self.ood(logits.log_softmax(1))


class LearnSigmoid(nn.Module):
    """sigma(w (s + b)) with learnable scalars w (init `weight`) and b (init `offset`)."""

    def __init__(self, weight: float = 1.0, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(weight)))
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.weight * (s + self.offset))
