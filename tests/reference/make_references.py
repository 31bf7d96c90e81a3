"""Reference networks for the weights-import parity tests, built by the real libraries.

Runs in the reference venv (`make reference-venv`: timm and torchvision beside a torch of their
own; PyPI's torchvision cannot import beside this machine's CPU torch build), never in the main
one, and imports nothing of methodlab's:

    .venv-ref/bin/python tests/reference/make_references.py --sources sources.json --out DIR

`sources.json` lists `{"name": "timm:vit_base_patch16_224", "library": "timm", "model": ...}`,
one per registered weights source (tests/test_weights_import.py writes it from the registry, so
a new source gets a reference by registering). For each, with random weights (`pretrained=False`,
seed 0, then every float tensor perturbed off its initial constant), in eval mode, DIR gets:

    <name>.pth           the library's own state dict, as a user would download it
    <name>.out.pt        {"x": (2, 3, 224, 224) in [0, 1], "logits": model(normalize(x)),
                          "mean", "std": the library's published input normalization,
                          "features": timm's forward_features (ViTs)}

and, for timm:vit_base_patch16_224, also the same weights as `.safetensors` and the model at
32x32 through timm's own position-embedding resampling (`<name>.at32.out.pt`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import save_file


def build(library: str, model: str):
    if library == "timm":
        net = timm.create_model(model, pretrained=False)
        cfg = net.pretrained_cfg
        return net, list(cfg["mean"]), list(cfg["std"])
    weights = torchvision.models.get_model_weights(model).DEFAULT
    net = torchvision.models.get_model(model, weights=None)
    preset = weights.transforms()
    return net, list(preset.mean), list(preset.std)


def perturb(net: torch.nn.Module) -> None:
    """Every float parameter and buffer off its initial value: the libraries start biases, some
    heads (torchvision's ViT) and BN statistics at constants, behind which a swapped or dropped
    key would go unseen."""
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.mul_(torch.empty_like(t).uniform_(0.5, 1.5))
            else:
                t.add_(torch.randn_like(t) * 0.02)


def normalized(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sources", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for src in json.loads(Path(args.sources).read_text()):
        if src["library"] not in ("timm", "torchvision"):
            continue                              # no library to build it (TOAST's layout: the test writes it)
        stem = out / src["name"].replace(":", "--")
        torch.manual_seed(0)
        net, mean, std = build(src["library"], src["model"])
        perturb(net)
        net.eval()
        x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            result = {"x": x, "logits": net(normalized(x, mean, std)), "mean": mean, "std": std}
            if src["library"] == "timm" and hasattr(net, "pos_embed"):
                result["features"] = net.forward_features(normalized(x, mean, std))
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        torch.save(state, f"{stem}.pth")
        torch.save(result, f"{stem}.out.pt")
        if src["name"] == "timm:vit_base_patch16_224":
            save_file(state, f"{stem}.safetensors")
            small = timm.create_model(src["model"], pretrained=False, img_size=32).eval()
            resized = dict(state, pos_embed=timm.layers.resample_abs_pos_embed(
                state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1))
            small.load_state_dict(resized)
            x32 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                torch.save({"x": x32, "logits": small(normalized(x32, mean, std))}, f"{stem}.at32.out.pt")
        print(f"{src['name']}: {sum(v.numel() for v in state.values()) / 1e6:.1f}M values", flush=True)
    (out / "DONE").write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__,
                                          "torchvision": torchvision.__version__}))


if __name__ == "__main__":
    main()
