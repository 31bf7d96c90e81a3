"""The pip requirements of the methodlab Ray image (infra/ray/Dockerfile): pyproject.toml's
dependencies with pyproject's pins, torch left out (the Dockerfile installs the Makefile's torch pin
from a CUDA or CPU index first and constrains it), and Ray kept at its pin so pip only adds the
extras' dependencies. Refuses, in one line, a base image whose Ray is not that pin: pip would
otherwise swap the image's Ray for another one.

    python requirements.py pyproject.toml > requirements.txt
"""

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version


def requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not re.match(r"torch\b", d)]


def main(pyproject: str) -> int:
    reqs = requirements(pyproject)
    ray_pin = next(d for d in reqs if re.match(r"ray(\[|==)", d)).split("==")[1]
    try:
        installed = version("ray")
    except PackageNotFoundError:
        installed = None
    if installed != ray_pin:
        print(f"error: the base image has Ray {installed}, pyproject pins ray=={ray_pin}; "
              f"build FROM rayproject/ray:{ray_pin}-py311[-gpu] (--build-arg BASE_IMAGE=...)", file=sys.stderr)
        return 1
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
