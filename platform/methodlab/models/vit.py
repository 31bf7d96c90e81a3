"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
arXiv 2010.11929) in the timm/DeiT layout: patch embedding, CLS token, learned position
embeddings, pre-norm blocks (LayerNorm eps 1e-6), final LayerNorm, linear head on the CLS token.

The attention exposes its value path: every block takes an optional top-down signal `td`
(B, N, C) that is projected by the block's own value weights and added to the values, which is
what TOAST (`methodlab.methods.toast`) steers. Q and K never see `td`.

Sizes are kwargs, from a tiny model for 8x8 digits to ViT-B/16:

    ViT(img_size=8, patch_size=2, in_channels=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    ViT()   # ViT-B/16: 224x224, patch 16, embed 768, depth 12, heads 12, MLP ratio 4

`toast_vit` (TopDownViT, below) wraps a ViT with TOAST's top-down path; its spec is
`{"arch": "toast_vit", "kwargs": {"vit": {<ViT kwargs>}, "num_classes": K, "lora_rank": r,
"value_bias": "free"}}`, so a transferred model rebuilds with `build_model` like any other.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from methodlab.models.layers import InputNormalization
from methodlab.registry import register_model

ValueBias = Literal["free", "faithful"]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., ECCV 2016); identity at rate 0 or in eval."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and an injectable value path."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def value_of(self, td: torch.Tensor, bias: bool) -> torch.Tensor:
        """W_v td (+ b_v when `bias`): (B, N, C) -> (B, N, C)."""
        dim = td.shape[-1]
        weight = self.qkv.weight[2 * dim:]
        b = self.qkv.bias[2 * dim:] if bias and self.qkv.bias is not None else None
        return F.linear(td, weight, b)

    def forward(self, x: torch.Tensor, td: torch.Tensor | None = None,
                value_bias: ValueBias = "free") -> torch.Tensor:
        """x, td: (B, N, C). With `td`, v = (W_v x + b_v) + W_v td, plus b_v again when
        value_bias="faithful" (the official TOAST code runs td through the whole qkv layer)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        if td is not None:
            v = v + self.value_of(td, bias=value_bias == "faithful")
        q, k, v = (t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)                           # (B, H, N, C/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x), td), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, td: torch.Tensor | None = None,
                value_bias: ValueBias = "free") -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), td, value_bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@register_model("vit", example={"kwargs": {"img_size": 8, "patch_size": 4, "in_channels": 1, "num_classes": 3,
                                         "embed_dim": 8, "depth": 2, "num_heads": 2}, "input": (2, 1, 8, 8)})
class ViT(nn.Module):
    """A ViT classifier; `embed(x)` is the CLS feature (B, embed_dim), `forward(x)` the logits.

    `num_classes=0` makes the head the identity (a backbone without a classifier).
    `input_mean`/`input_std`: the per-channel standardization an imported backbone was trained
    with, applied to the [0, 1] images first (`methodlab.models.layers.InputNormalization`).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_channels: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 input_mean: list[float] | None = None, input_std: list[float] | None = None):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.embed_dim, self.depth, self.num_classes = embed_dim, depth, num_classes
        self.normalize = InputNormalization(input_mean, input_std)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.num_tokens = (img_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth grows with depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal (std 0.02) for tokens and linears, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tokens_in(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C_in, H, W) -> input tokens (B, N, C): CLS first, position embeddings added."""
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)     # (B, N-1, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def run_blocks(self, x: torch.Tensor, td: list[torch.Tensor] | None = None,
                   value_bias: ValueBias = "free", keep_io: bool = False):
        """Tokens through every block and the final LayerNorm.

        td: None, or one (B, N, C) top-down signal per block (added to that block's values).
        Returns the normed tokens (B, N, C), and with `keep_io` also each block's (input, output).
        """
        io = []
        for i, block in enumerate(self.blocks):
            y = block(x, None if td is None else td[i], value_bias)
            if keep_io:
                io.append((x, y))
            x = y
        x = self.norm(x)
        return (x, io) if keep_io else x

    def forward_tokens(self, x: torch.Tensor, td: list[torch.Tensor] | None = None,
                       value_bias: ValueBias = "free") -> torch.Tensor:
        return self.run_blocks(self.tokens_in(x), td, value_bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]                                     # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))                                         # (B, num_classes)


# ----------------------------------------------------------------------------------------------
# TOAST's top-down ViT (Shi, Gai, Darrell, Wang, "TOAST: Transfer Learning via Attention
# Steering", arXiv 2305.15542; official code bfshi/TOAST, visual_classification/src/models/vit/
# vit_top_down.py). The pieces are pure functions so tests and the method can call them alone.


def token_mask(tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Token selection m_i = clamp(cos(x_i, xi), 0, 1) for every token, CLS included.

    tokens (B, N, C), prompt xi (C,) -> mask (B, N, 1) in [0, 1]; scale-free in xi (TOAST §3).
    """
    return (F.normalize(tokens, dim=-1) @ F.normalize(prompt, dim=0)).clamp(0, 1).unsqueeze(-1)


def feedback(decoders: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The feedback path from the top block down: h_L = x, h_l = W1_l h_{l+1}, td_l = W2_l h_l.

    x (B, N, C) -> one top-down signal (B, N, C) per block, bottom first. Linear maps per token,
    no mixing between tokens (official `feedback`, decoders visited from L-1 to 0).
    """
    td = []
    for decoder in reversed(decoders):
        x, out = decoder(x)
        td.append(out)
    return td[::-1]


class LoRALinear(nn.Module):
    """A bias-free square linear map with an optional low-rank update (Hu et al., "LoRA",
    ICLR 2022, arXiv 2106.09685): y = W x + (alpha / r) B A x with alpha = 1, A Kaiming-uniform,
    B zero, as `loralib.Linear(C, C, r, bias=False)` that TOAST-Lite uses. r = 0: plain W x."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)      # nn.Linear's default init
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Parameter(torch.empty(rank, dim))
            self.lora_B = nn.Parameter(torch.zeros(dim, rank))
            nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.rank > 0:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) / self.rank
        return y


class DecodeBlock(nn.Module):
    """Official `Decode_Block`: x1 = W1 x, out = W2 x1, both C x C without bias or activation."""

    def __init__(self, dim: int, lora_rank: int = 0):
        super().__init__()
        self.linear = LoRALinear(dim, lora_rank)
        self.linear2 = LoRALinear(dim, lora_rank)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.linear(x)
        return x1, self.linear2(x1)


def make_head(dim: int, num_classes: int) -> nn.Linear:
    """The official classification head (`MLP(..., special_bias=True)` with no hidden layer):
    Kaiming-normal (fan_out) weight and bias -log(99). The constant bias is a no-op under softmax
    but kept so the head starts as in the official code."""
    head = nn.Linear(dim, num_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log(99.0))
    return head


@register_model("toast_vit", example={
    "kwargs": {"vit": {"img_size": 8, "patch_size": 4, "in_channels": 1, "embed_dim": 8, "depth": 2, "num_heads": 2},
               "num_classes": 3}, "input": (2, 1, 8, 8)})
class TopDownViT(nn.Module):
    """A ViT backbone steered by TOAST's top-down attention; `forward(x)` gives the logits.

    vit: the backbone's ViT kwargs (its own head is dropped). Pass 1 (bottom-up, no_grad) gives
    tokens x; the mask selects tokens relevant to the prompt, P transforms them, the decoders
    turn them into one top-down signal per block, and pass 2 re-runs the blocks with those signals
    added to the values. value_bias: "free" (default; td = 0 reproduces the bottom-up model
    exactly) or "faithful" (the official code's qkv(td), which adds b_v a second time).
    """

    def __init__(self, vit: dict, num_classes: int, lora_rank: int = 0, value_bias: ValueBias = "free"):
        super().__init__()
        self.backbone = ViT(**{**vit, "num_classes": 0})
        dim = self.backbone.embed_dim
        self.value_bias = value_bias
        self.decoders = nn.ModuleList(DecodeBlock(dim, lora_rank) for _ in range(self.backbone.depth))
        self.prompt = nn.Parameter(torch.randn(dim))                 # xi, the task prior
        self.top_down_transform = nn.Parameter(torch.eye(dim))      # P, identity at start
        self.head = make_head(dim, num_classes) if num_classes > 0 else nn.Identity()

    def bottom_up(self, tokens_in: torch.Tensor) -> torch.Tensor:
        """Pass 1 under no_grad: nothing upstream of it trains in a TOAST mode, so gradients are
        the same and its activations are never kept."""
        with torch.no_grad():
            return self.backbone.run_blocks(tokens_in)

    def top_down(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pass-1 tokens (B, N, C) -> (one td (B, N, C) per block, mask (B, N, 1))."""
        mask = token_mask(tokens, self.prompt)
        return feedback(self.decoders, (tokens * mask) @ self.top_down_transform), mask

    def forward(self, x: torch.Tensor, aux: bool = False):
        """x (B, C_in, H, W) -> logits (B, num_classes); with `aux` also the variational-loss
        pairs [(W1_l out_l, in_l)] of pass 2 (block outputs/inputs detached, so only W1 gets
        their gradient) and the mask, computed here so DDP sees every use of the decoders."""
        tokens_in = self.backbone.tokens_in(x)
        td, mask = self.top_down(self.bottom_up(tokens_in))
        tokens, io = self.backbone.run_blocks(tokens_in, td, self.value_bias, keep_io=True)
        logits = self.head(tokens[:, 0])
        if not aux:
            return logits
        pairs = [(d.linear(out.detach()), inp.detach()) for d, (inp, out) in zip(self.decoders, io)]
        return logits, pairs, mask
