"""Every method module, imported so that its `@register_method` runs. One method per module."""

from methodlab.methods import supervised  # noqa: F401
from methodlab.methods import toast  # noqa: F401
from methodlab.methods import d3gzsl  # noqa: F401
from methodlab.methods import canonicalization  # noqa: F401
from methodlab.methods import mmanet  # noqa: F401
from methodlab.methods import bad_batches  # noqa: F401
