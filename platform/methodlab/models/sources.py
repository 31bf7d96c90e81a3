"""Foreign weights into a methodlab architecture: `methodlab models import`.

    methodlab models import vit_base_patch16_224.safetensors --from timm:vit_base_patch16_224 \\
        --register vit-b16 --license "Apache-2.0 (timm, augreg_in21k_ft_in1k)"
    methodlab models import resnet50-0676ba61.pth --from torchvision:resnet50 --out resnet50.pt
    methodlab models import vit.pth --from timm:vit_base_patch16_224 --img-size 384 --register vit-b16-384

A source (`--from library:name`, `methodlab models sources` lists them) is a registered `Source`:
the target architecture and its kwargs, an explicit key map, and the input normalization the
library's published weights expect (overridable with --mean/--std; check the tag you
downloaded: timm's augreg ViTs use 0.5/0.5, its ResNets and every torchvision model ImageNet's).

The map is total in both directions: every key of the file maps to a key of the architecture
and every key of the architecture comes from the file; either failure, and any shape mismatch,
is one error naming the key, raised before anything is built or registered. So a file of another
architecture than --from names is refused as such, not loaded half-way.

Files are read without executing code: `.safetensors` with safetensors, `.pth`/`.pt`/`.bin`
with `torch.load(weights_only=True)`. A checkpoint that nests its state dict under one of
`NESTED_KEYS` ("state_dict", "model", ...) or prefixes it with DDP's `module.` is unwrapped.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from methodlab import storage
from methodlab.errors import ConfigError
from methodlab.models.factory import build_model
from methodlab.registry import Table

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INCEPTION_MEAN, INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
NESTED_KEYS = ("state_dict", "model", "model_state", "module", "state_dict_ema")
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

Rule = tuple[str, "str | Callable[[re.Match], str]"]       # (regex on a file key, re.sub replacement)
SOURCES = Table("weights source", "--from", "methodlab.models")


@dataclass(frozen=True)
class Source:
    """How one library's state dict of one network becomes a methodlab model.

    reference: how the parity tests build the same network in its own library with random
    weights (tests/reference/make_references.py), so a new source is tested by registering."""

    name: str                                   # "library:model", what --from takes
    arch: str                                   # the methodlab architecture it becomes
    kwargs: dict                                # its kwargs at the native input size
    rules: tuple[Rule, ...]                     # first match wins; no match = an unmapped key
    mean: list[float]
    std: list[float]
    input_size: int = 224
    # Target keys a file may lack, keeping their initial value: the head (a headless export
    # becomes num_classes=0) and whatever the source documents.
    optional: tuple[str, ...] = ("head.weight", "head.bias")
    pos_embed_key: str | None = None            # a ViT's position embedding, resampled for --img-size
    reference: dict = field(default_factory=dict)

    def kwargs_at(self, size: int, num_classes: int, norm: dict) -> dict:
        """The architecture's kwargs for input `size`, the file's head and the input normalization."""
        if self.arch == "toast_vit":
            return {**self.kwargs, "vit": {**self.kwargs["vit"], "img_size": size, **norm}, "num_classes": num_classes}
        return {**self.kwargs, **({"img_size": size} if self.arch == "vit" else {}), "num_classes": num_classes, **norm}

    def rename(self, key: str) -> str | None:
        for pattern, repl in self.rules:
            if re.fullmatch(pattern, key):
                return re.sub(pattern, repl, key)
        return None


def register_source(source: Source) -> Source:
    SOURCES.register(source.name)(source)
    return source


def get_source(name: str) -> Source:
    return SOURCES.get(name)


def source_names() -> list[str]:
    return SOURCES.names()


# ----------------------------------------------------------------------------------------------
# Reading a weights file


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, flat, without running any code. Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    if p.suffix not in SUFFIXES:
        raise ConfigError(f"weights file {path}: expected one of {', '.join(SUFFIXES)} (got {p.suffix or 'no suffix'})")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"weights file {path} is truncated or not a safetensors file "
                              f"({str(e).splitlines()[0][:120]}); download it again") from None
    try:
        # Training checkpoints (timm's, DeiT's, TOAST's) carry their argparse options beside the
        # weights; a Namespace only sets attributes, so it is the one class let through.
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global: the file pickles objects, not just tensors.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it needs {found.group(1)})" if found else ""
        raise ConfigError(f"weights file {path} is a pickled checkpoint that needs code to load{what}; "
                          "refusing it: save its state dict alone (torch.save(model.state_dict(), f)) "
                          "or as .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"weights file {path} is truncated or not a PyTorch file "
                          f"({str(e).splitlines()[0][:120]}); download it again") from None
    return _state_dict_of(payload, path)


def _state_dict_of(payload, path: str) -> dict[str, torch.Tensor]:
    """A flat {key: tensor}: unwrap one level of NESTED_KEYS and DDP's `module.` prefix."""
    if isinstance(payload, dict):
        for key in NESTED_KEYS:
            if isinstance(payload.get(key), dict) and not any(torch.is_tensor(v) for v in payload.values()):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload:
        raise ConfigError(f"weights file {path} holds no state dict (a dict of tensors)")
    tensors = {k: v for k, v in payload.items() if torch.is_tensor(v)}
    if len(tensors) != len(payload):
        other = next(k for k, v in payload.items() if not torch.is_tensor(v))
        raise ConfigError(f"weights file {path}: key {other!r} is not a tensor; pass a plain state dict")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# ----------------------------------------------------------------------------------------------
# Converting


def resample_pos_embed(pos: torch.Tensor, grid: int, prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + g*g, C) -> (1, prefix + grid*grid, C): the patch positions resized as an image
    (bicubic, antialiased, as timm's `resample_abs_pos_embed`), the CLS position kept."""
    prefix, patches = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ConfigError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    if old == grid:
        return pos
    img = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()               # (1, C, g, g)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


@dataclass
class Converted:
    model: nn.Module
    spec: dict


def convert(path: str, source_name: str, img_size: int | None = None, mean: list[float] | None = None,
            std: list[float] | None = None, license: str = "") -> Converted:
    """A weights file of `source_name`'s network -> (model, spec). Raises ConfigError naming the
    key, shape or file at fault; nothing is written."""
    source = get_source(source_name)
    file_sd = read_weights(path)
    sd, named, unmapped = {}, {}, []         # named: methodlab key -> the file's, for messages
    for key, tensor in file_sd.items():
        target = source.rename(key)
        if target is None:
            unmapped.append(key)
        else:
            sd[target], named[target] = tensor, key
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise ConfigError(f"weights file {path}: key {unmapped[0]!r}{more} has no counterpart in {source.name}'s "
                          f"layout; is the file really {source.name}? (methodlab models sources lists the others)")

    size = img_size or source.input_size
    mean, std = mean or source.mean, std or source.std
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"--mean and --std take 3 values each, std > 0 (got {mean}, {std})")
    norm = {"input_mean": [float(v) for v in mean], "input_std": [float(v) for v in std]}
    classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    kwargs = source.kwargs_at(size, classes, norm)
    if source.pos_embed_key in sd:
        patch = source.kwargs.get("vit", source.kwargs)["patch_size"]
        if size % patch:
            raise ConfigError(f"--img-size {size} is not a multiple of {source.name}'s patch size {patch}")
        if sd[source.pos_embed_key].shape[1] == (source.input_size // patch) ** 2 + 1:
            sd[source.pos_embed_key] = resample_pos_embed(sd[source.pos_embed_key], size // patch)
    # `input` documents what the model takes (its MLflow signature's metadata); the model applies
    # the normalization itself, from its kwargs.
    spec = {"arch": source.arch, "kwargs": kwargs,
            "input": {"dtype": "float32", "shape": [3, size, size], "range": [0.0, 1.0],
                      "mean": norm["input_mean"], "std": norm["input_std"], "normalized_by": "the model"},
            "source": {"from": source.name, "file": Path(path).name, "sha256": storage.digest(path)[1],
                       "license": license or "unspecified"}}

    with torch.device("meta"):              # shapes only: no memory for a ViT-L we may refuse
        expected = build_model(spec).state_dict()
    for key, tensor in sd.items():
        if key not in expected:     # a key the map accepts but this size of the network lacks
            raise ConfigError(f"weights file {path}: key {named[key]!r} has no counterpart in "
                              f"{source.name}; is the file really {source.name}?")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConfigError(f"weights file {path}: {named[key]!r} has shape {tuple(tensor.shape)} "
                              f"but {source.name} has {tuple(expected[key].shape)}; the file is another "
                              "network: pass the --from it came from")
    missing = [k for k in expected if k not in sd and k not in source.optional]
    if missing:
        raise ConfigError(f"weights file {path} has no key for methodlab's {missing[0]!r}, which "
                          f"{source.name} has; is the file really {source.name}?")
    model = build_model(spec)
    # Every key was checked above; an optional one the file lacks keeps its initial value.
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)
    return Converted(model.eval(), spec)


# ----------------------------------------------------------------------------------------------
# The sources: ViT-S/B/L patch 16 (timm), ViT-B/L 16 (torchvision), ResNet-18/50 (both)

_BLOCK = r"blocks\.(\d+)\."
TIMM_VIT_RULES: tuple[Rule, ...] = (
    (r"cls_token|pos_embed", r"\g<0>"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (_BLOCK + r"(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_BLOCK + r"mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
    (r"(norm|head)\.(weight|bias)", r"\1.\2"),
)
_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
TORCHVISION_VIT_RULES: tuple[Rule, ...] = (
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_LAYER + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_LAYER + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (_LAYER + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_LAYER + r"mlp\.0\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (_LAYER + r"mlp\.3\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
)
VIT_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}   # (C, depth, heads)


def _vit_kwargs(size: str) -> dict:
    dim, depth, heads = VIT_SIZES[size]
    return {"patch_size": 16, "in_channels": 3, "embed_dim": dim, "depth": depth, "num_heads": heads}


for _size in VIT_SIZES:
    register_source(Source(f"timm:vit_{_size}_patch16_224", "vit", _vit_kwargs(_size), TIMM_VIT_RULES,
                           INCEPTION_MEAN, INCEPTION_STD, pos_embed_key="pos_embed",
                           reference={"library": "timm", "name": f"vit_{_size}_patch16_224"}))
for _size, _name in (("base", "vit_b_16"), ("large", "vit_l_16")):
    register_source(Source(f"torchvision:{_name}", "vit", _vit_kwargs(_size), TORCHVISION_VIT_RULES,
                           IMAGENET_MEAN, IMAGENET_STD, pos_embed_key="pos_embed",
                           reference={"library": "torchvision", "name": _name}))

# TOAST's released top-down ViT-B/16 (bfshi/TOAST, visual_classification/README "Model Zoo",
# ViT-B-in1k / ViT-B-in21k "top-down", pre-tuned on ImageNet-1k). The official loader
# (src/models/vit/vit_top_down.py, `vit_topdown_base_patch16_224`) takes the "model" entry of
# the DeiT/AbSViT training checkpoint {"model", "optimizer", ..., "args"}: a timm-layout ViT plus
# `decoders.{i}.linear/linear2.weight` (C, C), `prompt` (C,) and `top_down_transform` (C, C), all
# in our layout (P applied as x @ P). The value path runs td through the whole qkv layer, so the
# weights are `value_bias="faithful"`. AbSViT-trained files have no P: it stays the identity, as
# the official `load_state_dict(strict=False)` leaves it. Transfer (FGVC) checkpoints, with an
# `enc.` prefix and `head.last_layer`, are not published and not accepted.
TOAST_RULES: tuple[Rule, ...] = (
    *((pattern, repl if repl.startswith("head") else "backbone." + repl)
      for pattern, repl in TIMM_VIT_RULES if not pattern.startswith("(norm|head)")),
    (r"norm\.(weight|bias)", r"backbone.norm.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
    (r"decoders\.(\d+)\.(linear|linear2)\.weight", r"\g<0>"),
    (r"prompt|top_down_transform", r"\g<0>"),
)
register_source(Source("toast:vit_topdown_base_patch16_224", "toast_vit",
                       {"vit": _vit_kwargs("base"), "value_bias": "faithful", "lora_rank": 0}, TOAST_RULES,
                       IMAGENET_MEAN, IMAGENET_STD, pos_embed_key="backbone.pos_embed",
                       optional=("head.weight", "head.bias", "top_down_transform"),
                       reference={"library": "toast", "name": "vit_topdown_base_patch16_224"}))

RESNET_STEM = 4          # methodlab ResNet.encoder: conv, bn, relu, maxpool, then the blocks


def resnet_rules(blocks: tuple[int, ...]) -> tuple[Rule, ...]:
    """torchvision's (and timm's: the same names) ResNet keys -> methodlab's flat `encoder`."""
    first = [RESNET_STEM + sum(blocks[:i]) for i in range(len(blocks))]   # encoder index of layer{i+1}.0

    def block(m: re.Match) -> str:
        layer, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        rest = rest.replace("downsample.", "shortcut.")
        return f"encoder.{first[layer - 1] + j}.{rest}"

    bn = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
    return ((r"conv1\.weight", "encoder.0.weight"),
            (r"bn1\." + bn, r"encoder.1.\1"),
            (rf"layer([1-{len(blocks)}])\.(\d+)\.((?:conv\d|bn\d|downsample\.[01])\.\w+)", block),
            (r"fc\.(weight|bias)", r"head.\1"))


RESNETS = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet50": ((3, 4, 6, 3), "bottleneck")}
for _name, (_blocks, _unit) in RESNETS.items():
    for _lib in ("timm", "torchvision"):
        register_source(Source(
            f"{_lib}:{_name}", "resnet",
            {"in_channels": 3, "width": 64, "blocks": list(_blocks), "stem_stride": 2, "stem_kernel": 7, "block": _unit},
            resnet_rules(_blocks), IMAGENET_MEAN, IMAGENET_STD,
            reference={"library": _lib, "name": _name}))
