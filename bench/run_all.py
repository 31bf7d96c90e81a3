"""`make bench`: run every bench/*.py (each writes bench/results/<name>.json and prints ratios).

    .venv/bin/python bench/run_all.py [name ...]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    # tune chooses the hyperparameters the others read, so it runs first; quality reads the
    # other benchmarks' results, so it runs last
    scripts = sorted((p for p in HERE.glob("*.py") if p.stem not in ("common", "run_all")),
                     key=lambda p: (p.stem == "quality", p.stem != "tune", p.stem))
    if names:
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        print(f"\n=== bench/{script.name} ===", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
