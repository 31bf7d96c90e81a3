"""Train one method as a Ray job.

On a running cluster (the local stack from `make stack-up`, or a real one):

    methodlab submit --address http://127.0.0.1:8265 train supervised -c jobs/configs/supervised.yaml \
        storage.path=s3://methodlab/runs tracking.uri=http://127.0.0.1:5000

which checks the config first, records the checkout's git commit, and runs

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py supervised -c jobs/configs/supervised.yaml \
        storage.path=s3://methodlab/runs tracking.uri=http://127.0.0.1:5000

Locally, without a cluster (starts Ray in-process), the same arguments work:

    python jobs/train.py supervised train.epochs=3

Submitting the same run name again (train.run_name=..., or the same config) resumes that run
from its latest checkpoint, in the same MLflow run. The working_dir upload skips what
.rayignore lists (.git, .venv, data, results).
"""

import os
import sys

# `--working-dir .` ships the repo, not an installed package: make the source root importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from methodlab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
