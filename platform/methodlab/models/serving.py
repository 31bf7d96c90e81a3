"""What a registered model takes and gives when it is served, without MLflow.

A registered model (MLflow's pyfunc flavour, `tracking.pyfunc_model_class`) takes its input *raw*, as
the dataset stores the column the method exports (`Method.export_input`): digits' `image` is
uint8 ink counts 0..16 (scale 1/16), an imported image dataset's uint8 0..255 (scale 1/255),
multimodal `packed` the modalities flattened and concatenated, GZSL `features` float32. The
served model decodes that itself, exactly as training did on the device (`data.decode`: times
the column's scale, then the train split's mean/std where the run had `data.normalize=true`),
and returns each row's label (the class index, the dataset's `label`) and class probabilities.

`input_doc` is the description of that raw input that travels with the model (its MLmodel
metadata `input` and model config); `Predictor` rebuilds the network from the spec and a
weights-only state dict and applies it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from methodlab.data.dataset import Column, DatasetInfo
from methodlab.data.decode import ColumnDecode
from methodlab.models.factory import build_model

# Who applies an input's mean/std: a network trained on standardized data gets it from the
# served model; an imported one carries it in its kwargs and applies it itself (its spec's
# `input` says "the model", `models.sources`), so the pyfunc leaves that input as it is.
BY_PYFUNC = "the pyfunc"


def input_doc(info: DatasetInfo, column: str, normalize: bool) -> dict:
    """The raw input of a model trained on `info` that takes `column` (with `data.normalize`):
    dtype and shape as stored (batch first, -1), the scale and value range of a scaled integer
    column (stored = decoded / scale, decoded in [0, 1]: digits 0..16, images 0..255), the
    mean/std the pyfunc standardizes with, and for a packed multimodal column its layout."""
    col: Column = info.columns[column]
    doc: dict = {"dtype": col.dtype, "shape": [-1, *col.shape]}
    if col.scale is not None:
        top = min(round(1 / col.scale), int(np.iinfo(np.dtype(col.dtype)).max))
        doc.update(range=[0, top], scale=col.scale)
        if normalize and col.mean:
            doc.update(mean=list(col.mean), std=list(col.std), normalized_by=BY_PYFUNC)
    if column == info.meta.get("packed_column"):
        # (sum of sizes,): each modality flattened in this order; a missing one is a NaN slice
        # (float layouts only: uint8 has no NaN).
        doc["layout"] = [{"modality": m, "shape": list(info.columns[m].shape)} for m in info.meta["modalities"]]
    return doc


def classifies(spec: dict) -> bool:
    """Whether the network ends in class logits; an imported backbone without a head
    (`num_classes` 0) gives features instead."""
    kwargs = spec.get("kwargs", {})
    return kwargs.get("num_classes", kwargs.get("vit", {}).get("num_classes")) != 0


class Predictor:
    """Raw rows in, {"label": (B,) int64, "probabilities": (B, K) float32} out, on the CPU
    ({"features": (B, D)} for a network without a head)."""

    def __init__(self, spec: dict, state_dict: dict[str, torch.Tensor], doc: dict):
        self.classifies = classifies(spec)
        self.model: nn.Module = build_model(spec)
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self.doc = doc
        by_us = doc.get("normalized_by") == BY_PYFUNC
        self.decode = ColumnDecode(doc.get("scale") or 1.0, *((tuple(doc["mean"]), tuple(doc["std"])) if by_us else ()))

    @classmethod
    def from_files(cls, spec: dict, weights_path: str, doc: dict) -> "Predictor":
        return cls(spec, torch.load(weights_path, map_location="cpu", weights_only=True), doc)

    def check(self, raw: np.ndarray) -> None:
        """The documented input or one line naming what differs (dtype is cast by MLflow from
        the signature; shape and range are what a caller gets wrong)."""
        want = tuple(self.doc["shape"][1:])
        if raw.ndim != len(want) + 1 or tuple(raw.shape[1:]) != want:
            raise ValueError(f"input has shape {list(raw.shape)}, expected {self.doc['shape']} "
                             f"({self.doc['dtype']}, as the dataset stores it)")
        if "range" in self.doc and raw.size:
            lo, hi = self.doc["range"]
            if raw.min() < lo or raw.max() > hi:
                how = f"the model scales them by {self.doc['scale']:g} itself" if "scale" in self.doc else "unscaled"
                raise ValueError(f"input values span [{raw.min()}, {raw.max()}], expected raw values in "
                                 f"[{lo}, {hi}] ({how})")

    @torch.no_grad()
    def predict(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        raw = np.asarray(raw)
        self.check(raw)
        out = self.model(self.decode(torch.from_numpy(np.array(raw))))   # (B, K) logits
        if not self.classifies:
            return {"features": out.float().numpy()}
        probs = torch.softmax(out.float(), dim=-1)
        return {"label": probs.argmax(-1).numpy().astype(np.int64), "probabilities": probs.numpy()}
