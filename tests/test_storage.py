"""S3 through a real S3-compatible server (moto, on 127.0.0.1): datasets, checkpoints, preflight."""

from __future__ import annotations

import numpy as np
import pytest

from methodlab import storage
from methodlab.config import load_config
from methodlab.data import open_dataset, prepare_builtin, read_split
from methodlab.errors import ServiceError


def test_dataset_round_trip_through_s3(bucket, tmp_path):
    endpoint, name = bucket
    storage.configure(load_config("supervised", None, [f"storage.endpoint_url={endpoint}"]).storage)
    local = prepare_builtin("digits", str(tmp_path))
    info = prepare_builtin("digits", f"s3://{name}/datasets")
    assert info.uri == f"s3://{name}/datasets/digits"
    again = open_dataset(info.uri)
    for split in ("train", "test"):
        np.testing.assert_array_equal(read_split(again, split)["image"], read_split(local, split)["image"])


def test_preflight_names_the_missing_bucket_and_the_dead_endpoint(bucket):
    endpoint, _ = bucket
    with pytest.raises(ServiceError, match="S3 bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        storage.check_reachable("s3://no-such-bucket/runs", storage.S3Settings(endpoint, "us-east-1"))
    with pytest.raises(ServiceError, match="S3 endpoint http://127.0.0.1:9 is unreachable"):
        storage.check_reachable("s3://any/runs", storage.S3Settings("http://127.0.0.1:9", "us-east-1"))


@pytest.mark.slow
def test_streamed_s3_dataset_and_s3_checkpoints(ray_cluster, home, bucket):
    """Ray Data streams the train split from S3 to 2 workers; checkpoints land in the bucket."""
    from methodlab.train.launch import train

    endpoint, name = bucket
    storage.configure(load_config("supervised", None, [f"storage.endpoint_url={endpoint}"]).storage)
    prepare_builtin("digits", f"s3://{name}/datasets")
    cfg = load_config("supervised", None, [
        f"data.dataset=s3://{name}/datasets/digits", "data.loader=stream", "train.epochs=2",
        "scaling.num_workers=2", f"storage.path=s3://{name}/runs", f"storage.endpoint_url={endpoint}",
        "train.run_name=streamed"])
    summary = train(cfg)
    assert summary.status == "FINISHED" and summary.metrics["test_acc"] > 0.2
    keys = [o["Key"] for o in storage.s3_client(storage.S3Settings(endpoint, "us-east-1"))
            .list_objects_v2(Bucket=name, Prefix="runs/streamed/")["Contents"]]
    assert any(k.endswith("/state.pt") and "/checkpoint_" in k for k in keys), keys
