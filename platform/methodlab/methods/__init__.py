"""Every method module, imported so that its `@register_method` runs. One method per module.

Importing this package fills all three registries (the methods import the models and datasets
they build on, and those packages register all of theirs): the CLI, the Ray worker, the demo
and the report import it once. Nothing below it imports it back.
"""

import methodlab.data  # noqa: F401  (every built-in dataset)
import methodlab.models  # noqa: F401  (every architecture)

from methodlab.methods import supervised  # noqa: F401
from methodlab.methods import toast  # noqa: F401
from methodlab.methods import d3gzsl  # noqa: F401
from methodlab.methods import canonicalization  # noqa: F401
from methodlab.methods import mmanet  # noqa: F401
from methodlab.methods import bad_batches  # noqa: F401
