"""GPU path: model FLOP utilization (MFU) of TOAST's training step on its ViT, bf16 autocast
against fp32 for that step, and channels-last against contiguous for a convolutional step, all
measured in this process on its device.

On a GPU: ViT-B/16 at 224 px, batch 64, TOAST transfer mode (the backbone frozen; the top-down
decoders, prompt, P and head train), bf16 autocast. MFU = model FLOPs per step (forward and
backward, counted by torch.utils.flop_counter) / step time / the GPU's dense bf16 peak. On a CPU,
where no peak applies, a tiny ViT on 8x8 digits and the achieved FLOP/s only.

    .venv/bin/python bench/gpu_path.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Figure, device_name, timeit, write_results  # noqa: E402

from methodlab.methods.toast import trains  # noqa: E402
from methodlab.models.resnet import ResNet  # noqa: E402
from methodlab.models.vit import TopDownViT  # noqa: E402
from methodlab.train.core import place_model  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; matched on the device name.
BF16_PEAK = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L4": 121.0e12}

GPU_VIT = dict(img_size=224, patch_size=16, in_channels=3, embed_dim=768, depth=12, num_heads=12)   # ViT-B/16
CPU_VIT = dict(img_size=8, patch_size=2, in_channels=1, embed_dim=64, depth=4, num_heads=4)


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def toast_step(device: torch.device, vit: dict, batch: int, autocast: bool):
    """One TOAST transfer step (cross-entropy only, as the official transfer) as a closure."""
    model = TopDownViT(vit, num_classes=10).to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(trains("toast", name))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, vit["in_channels"], vit["img_size"], vit["img_size"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def conv_step(device: torch.device, channels_last: bool, batch: int, size: int):
    """One supervised step of the ResNet that Bad Batches trains, placed as the loop places it."""
    model = ResNet(in_channels=3, num_classes=10)
    model = place_model(model, device) if channels_last else model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def synced(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def main() -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    name = device_name()
    vit, batch = (GPU_VIT, 64) if gpu else (CPU_VIT, 64)
    figures = []

    bf16 = toast_step(device, vit, batch, autocast=True)
    with FlopCounterMode(display=False) as counter:
        bf16()
    flops = counter.get_total_flops()
    bf16_s = timeit(synced(bf16, device), repeat=10, warmup=3)
    peak = bf16_peak(name) if gpu else None
    achieved = flops / bf16_s
    figures.append(Figure("vit_toast_step_mfu", achieved / peak if peak else None, "dense bf16 peak of the device",
                          {"device": name, "flops_per_step": float(flops), "step_s": bf16_s,
                           "achieved_tflops": achieved / 1e12, "peak_tflops": (peak or 0) / 1e12,
                           "vit": "B/16 224px" if gpu else "tiny 8px", "batch": batch}))

    fp32_s = timeit(synced(toast_step(device, vit, batch, autocast=False), device), repeat=10, warmup=3)
    figures.append(Figure("vit_toast_step_bf16_speedup", fp32_s / bf16_s, "the same step in fp32",
                          {"device": name, "bf16_step_s": bf16_s, "fp32_step_s": fp32_s}))

    if gpu:   # the loop applies channels-last on GPUs only
        contiguous_s = timeit(synced(conv_step(device, False, 256, 64), device), repeat=10, warmup=3)
        last_s = timeit(synced(conv_step(device, True, 256, 64), device), repeat=10, warmup=3)
        figures.append(Figure("resnet_step_channels_last_speedup", contiguous_s / last_s, "the same step, contiguous",
                              {"device": name, "step_s": last_s, "contiguous_step_s": contiguous_s,
                               "batch": 256, "size": 64}))
    write_results("gpu_path", figures, {"device": name})


if __name__ == "__main__":
    main()
