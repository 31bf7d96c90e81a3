"""Every method module, imported so that its `@register_method` runs. One method per module: a
new method is a new module here, found without editing this file.

Importing this package fills all three registries (the methods import the models and datasets
they build on, and those packages register all of theirs): the CLI, the Ray worker, the demo
and the report import it once. Nothing below it imports it back.
"""

import methodlab.data  # noqa: F401  (every built-in dataset)
import methodlab.models  # noqa: F401  (every architecture)
from methodlab.registry import import_submodules

import_submodules(__name__, __path__)
