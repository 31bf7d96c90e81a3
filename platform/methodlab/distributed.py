"""Collectives the loop and the methods share: plain `torch.distributed`, no Ray, so the same code
runs under Ray Train, torchrun and in a single process (where every helper is the identity).

    rows = shard(split)              # this rank's contiguous rows of an evaluation split
    totals = all_sum(counts)         # sums over ranks (float64, exact for counts)
    bank = gather_uneven_rows(x)     # every rank's rows in rank order (shards may differ in size)
    z_all = gather_rows(z)           # all_gather of equal shards; its backward hands each rank its gradient

Evaluation reduces sums and counts rather than gathering predictions, so a metric costs one
small collective whatever the split size, and sharded evaluation equals single-rank evaluation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank` when n rows are cut into `world_size` contiguous shards
    that differ in size by at most one (no padding: every row is counted exactly once)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(split):
    """This rank's contiguous shard of a SplitData (the whole split without a process group)."""
    rank, size = world()
    if size == 1:
        return split
    start, stop = shard_range(len(split), rank, size)
    return dataclasses.replace(split, tensors={k: v[start:stop] for k, v in split.tensors.items()})


def _wire(t: torch.Tensor) -> torch.Tensor:
    """`t` where the backend can reduce it: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks, in float64 (counts stay exact up to 2**53), on `t`'s device."""
    out = t.detach().double()
    if world()[1] > 1:
        wired = _wire(out.clone())
        dist.all_reduce(wired)
        out = wired.to(t.device)
    return out


def gather_uneven_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (n_r, ...), concatenated in rank order; shards may differ in size
    (padded to the largest for the collective, trimmed after). The same tensor on every rank."""
    rank, size = world()
    if size == 1:
        return t
    wired = _wire(t)
    counts = torch.tensor([len(t)], device=wired.device)
    everyone = [torch.empty_like(counts) for _ in range(size)]
    dist.all_gather(everyone, counts)
    sizes = torch.cat(everyone).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=wired.device)
    padded[:len(t)] = wired
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


def all_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (for rare, small payloads: RNG states)."""
    if world()[1] == 1:
        return [obj]
    everyone: list = [None] * world()[1]
    dist.all_gather_object(everyone, obj)
    return everyone


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; the backward sums every rank's gradient of the gathered tensor
    and hands each rank its own rows (lightly's `GatherLayer`, lightly/utils/dist.py). With DDP's
    gradient mean this gives the gradient of the mean loss over all ranks' anchors."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


class _SumWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward all-reduces the gradient: d(sum over ranks)/d(each rank's
    input) is the sum of every rank's upstream gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (equal sizes), in rank order, differentiable; `t` without a group."""
    if world()[1] == 1:
        return t
    return torch.cat(_GatherWithGrad.apply(t))


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm on every device


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, on any device. torch's `nn.SyncBatchNorm`
    only runs on GPUs (its CPU forward raises), so CPU (gloo) runs use this one: the per-channel
    sum, sum of squares and count are all-reduced with autograd (`_SumWithGrad`), which
    gives the same forward, backward and running statistics as one rank holding the whole batch.
    In eval mode, or without a process group, it is a plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = _SumWithGrad.apply(torch.cat([xf.sum(dims), xf.square().sum(dims), count]))   # (2C + 1,)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)                        # biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_SYNCED = (nn.SyncBatchNorm, GlobalBatchNorm)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` made global across ranks: torch's SyncBatchNorm on CUDA,
    GlobalBatchNorm elsewhere. Parameters and buffers are shared with the original layers, so
    state dicts keep their keys and load into the plain model."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    return _replace_batchnorm(model, cls)


def _replace_batchnorm(module: nn.Module, cls) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _SYNCED):
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        return new.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _replace_batchnorm(child, cls))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise): what evaluation, export and
    frozen calls use, so that they run no DDP collectives."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def broadcast_buffers(models: dict[str, nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: DDP keeps parameters equal, but each
    rank's last forward updates its own running statistics, and a sharded evaluation must see one
    model. One collective per buffer, once per evaluation."""
    if world()[1] == 1:
        return
    for model in models.values():
        for buf in model.buffers():
            dist.broadcast(buf.data, src=0)

