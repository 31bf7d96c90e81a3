"""Sweep one method's hyperparameters as a Ray job: a Ray Tune sweep whose trials are Ray Train runs.

On a running cluster (the local stack from `make stack-up`, or a real one):

    methodlab submit --address http://127.0.0.1:8265 sweep supervised -c jobs/sweeps/supervised.yaml \
        storage.path=s3://methodlab/runs tracking.uri=http://127.0.0.1:5000

which checks the config first, records the checkout's git commit, and runs

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py supervised -c jobs/sweeps/supervised.yaml \
        storage.path=s3://methodlab/runs tracking.uri=http://127.0.0.1:5000

Locally, without a cluster (starts Ray in-process), the same arguments work:

    python jobs/sweep.py supervised -c jobs/sweeps/supervised.yaml search.num_samples=4

Overrides: `search.*`, `space.<dotted key>={loguniform: [lo, hi]}` and `name=...` change the
sweep; any other `key=value` (train.epochs=3, scaling.num_workers=2) changes the run config of every
trial. Submitting a sweep of the same name again (name=..., or the same file and overrides)
resumes it from its Tune state under storage.path/<name>: finished trials are kept, unfinished
ones continue from their last checkpoint, in the same MLflow runs.
"""

import os
import sys

# `--working-dir .` ships the repo, not an installed package: make the source root importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from methodlab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
