"""The table of `methodlab data import-<format>` commands: what each reads and which CLI options it
takes. The CLI builds its subcommands from it and the tests iterate it (every importer's bad
source is one line, and writes nothing).

    methodlab data import-cifar10 cifar-10-batches-py --out /data/cifar10
    methodlab data import-cifar100 cifar-100-python --out /data/cifar100
    methodlab data import-stl10 stl10_binary --out /data/stl10 [--no-unlabeled]
    methodlab data import-flowers102 flowers102 --out /data/flowers102 --size 64 [--workers N]
    methodlab data import-casia-surf train_list.txt [val_list.txt test_list.txt] --root <dir> --out ...
    methodlab data import-nyuv2 nyu_depth_v2_labeled.mat [--splits splits.mat] --out /data/nyuv2 --size 64
    methodlab data import-xlsa17 xlsa17/data/CUB --out /data/cub

(`methodlab data import <folder>` is the class-per-subfolder image folder, `imagefolder`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from methodlab.data import casia, cifar, flowers, gzsl, nyuv2, stl10


@dataclass(frozen=True)
class Importer:
    run: Callable                 # (*sources, out, **options) -> DatasetInfo
    sources: str                  # what the positional arguments are, for the usage line
    options: tuple[str, ...] = ()  # CLI options passed through as keywords (argparse dest names)
    max_sources: int = 1


IMPORTERS: dict[str, Importer] = {
    "import-cifar10": Importer(cifar.import_cifar10, "<cifar-10-batches-py dir>"),
    "import-cifar100": Importer(cifar.import_cifar100, "<cifar-100-python dir>"),
    "import-stl10": Importer(stl10.import_stl10, "<stl10_binary dir>", ("unlabeled",)),
    "import-flowers102": Importer(flowers.import_flowers102, "<dir with jpg/, imagelabels.mat, setid.mat>",
                                  ("size", "workers")),
    "import-casia-surf": Importer(casia.import_casia_surf, "<train list> [<val list> <test list>]",
                                  ("root", "size", "workers"), max_sources=3),
    "import-nyuv2": Importer(nyuv2.import_nyuv2, "<nyu_depth_v2_labeled.mat>", ("splits_file", "size")),
    "import-xlsa17": Importer(gzsl.import_xlsa17, "<dir with res101.mat and att_splits.mat>"),
}
