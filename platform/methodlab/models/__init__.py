"""Model architectures, registered by name so that a saved model is rebuilt from its spec.

A spec is `{"arch": <registered name>, "kwargs": {...}}`. Weights travel as a plain state dict
beside the spec and are always loaded with `torch.load(..., weights_only=True)`: no pickled code
is ever executed when a backbone is loaded (see `methodlab.models.hub`).
"""

from __future__ import annotations

from methodlab.models import cnn  # noqa: F401  (registers architectures)
from methodlab.models import canonicalizer  # noqa: F401  (canonicalized, group_averaged)
from methodlab.models import gzsl  # noqa: F401  (gzsl_classifier)
from methodlab.models import resnet  # noqa: F401  (resnet)
from methodlab.models import vit  # noqa: F401  (vit, toast_vit)
from methodlab.models import sources  # noqa: F401  (weights sources for `methodlab models import`)
from methodlab.models import mmanet  # noqa: F401  (mmanet)
from methodlab.models.factory import build_model

__all__ = ["build_model"]
