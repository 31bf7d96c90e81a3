"""The only module that talks to S3 (boto3 and pyarrow.fs). Local paths and s3:// URIs look the same
to the rest of the platform: `filesystem(uri)` gives a pyarrow filesystem and a path inside it.

S3 settings come from the config (`storage.endpoint_url`, `storage.region`) or the standard AWS
variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); the
credentials themselves are only ever read from the environment or the instance role, never
from config files, so they cannot reach MLflow params or logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from methodlab.errors import ServiceError


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage_cfg=None) -> "S3Settings":
        endpoint = getattr(storage_cfg, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        region = getattr(storage_cfg, "region", None) or os.environ.get("AWS_DEFAULT_REGION") \
            or os.environ.get("AWS_REGION") or "us-east-1"
        return cls(endpoint, region)


_DEFAULT: S3Settings | None = None


def configure(storage_cfg) -> S3Settings:
    """Make the run's `storage` section the default for every S3 access in this process (the
    driver, and each Ray worker before it reads data or checkpoints)."""
    global _DEFAULT
    _DEFAULT = S3Settings.from_config(storage_cfg)
    return _DEFAULT


def _settings(settings: S3Settings | None) -> S3Settings:
    return settings or _DEFAULT or S3Settings.from_config()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def filesystem(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    s = _settings(settings)
    kwargs: dict = {"region": s.region}
    if s.endpoint_url:
        parsed = urlparse(s.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    bucket, key = split_s3(uri)
    # Retries with backoff for transient endpoint loss (pyarrow's AWS standard retry strategy).
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def s3_client(settings: S3Settings | None = None):
    import boto3
    from botocore.config import Config

    s = _settings(settings)
    return boto3.client("s3", endpoint_url=s.endpoint_url, region_name=s.region,
                        config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                      connect_timeout=3, read_timeout=10))


def check_reachable(uri: str, settings: S3Settings | None = None) -> None:
    """Preflight: the bucket exists and answers. Raises ServiceError with one line otherwise."""
    if not is_s3(uri):
        return
    import botocore.exceptions as bexc

    s = _settings(settings)
    bucket, _ = split_s3(uri)
    where = s.endpoint_url or "AWS S3"
    try:
        s3_client(s).head_bucket(Bucket=bucket)
    except bexc.EndpointConnectionError:
        raise ServiceError(f"S3 endpoint {where} is unreachable for {uri}; start it or fix "
                           "storage.endpoint_url / AWS_ENDPOINT_URL") from None
    except bexc.NoCredentialsError:
        raise ServiceError(f"no S3 credentials for {uri}; set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY or use an instance role") from None
    except bexc.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise ServiceError(f"S3 bucket {bucket!r} does not exist at {where}; create it "
                               f"(aws s3 mb s3://{bucket}) or fix storage.path") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise ServiceError(f"S3 refused the credentials for bucket {bucket!r} at {where} ({code}); "
                               "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        raise ServiceError(f"S3 error for {uri} at {where}: {code or e}") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_output(uri: str):
    """A writable stream to `uri` (a local file's directories are created first)."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
    return fs.open_output_stream(path)


def write_bytes(uri: str, data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def remove_dir(uri: str) -> None:
    """Delete a directory (a local tree, or every object under an S3 prefix); nothing if absent."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def replace_dir(src: str, dst: str) -> None:
    """Move directory `src` to `dst` on the same store, replacing whatever was at `dst`. Locally a rename; on S3
    (which has no directory rename) server-side copies of each object, then `src` is deleted."""
    remove_dir(dst)
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_s3(src):
        pafs.copy_files(src_path, dst_path, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src_path)
    else:
        fs.create_dir(os.path.dirname(dst_path), recursive=True)
        fs.move(src_path, dst_path)


def listdir(uri: str) -> list[tuple[str, bool]]:
    """(name, is_directory) of the entries directly under `uri`; empty if it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((os.path.basename(i.path), i.type == pafs.FileType.Directory) for i in infos)


def upload_dir(local_dir: str, uri: str) -> None:
    fs, path = filesystem(uri)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str) -> None:
    fs, path = filesystem(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def digest(uri: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file, read in chunks."""
    import hashlib

    fs, path = filesystem(uri)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def remove_file(uri: str) -> None:
    """Delete one file; nothing if absent."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


# Conditional writes, for the run lease (`train.lease`): the one place two submissions of a run
# can race, so these are atomic on the store itself. S3: conditional puts (If-None-Match: * to
# create, If-Match: <ETag> to replace; pyarrow has neither). Locally: a hard link (fails if the
# name exists, and the file is complete before it appears) and an flock around compare-and-replace.
# A "tag" identifies the version read or written: the ETag on S3, the content's sha256 locally.


def read_tagged(uri: str) -> tuple[bytes, str] | None:
    """The file's content and tag, or None if it does not exist."""
    import hashlib

    if is_s3(uri):
        import botocore.exceptions as bexc

        bucket, key = split_s3(uri)
        try:
            got = s3_client().get_object(Bucket=bucket, Key=key)
        except bexc.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        return got["Body"].read(), got["ETag"]
    try:
        data = open(uri, "rb").read()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def put_if(uri: str, data: bytes, match: str | None = None) -> str | None:
    """Write `data` to `uri` only if it does not exist (`match` None) or still has tag `match`;
    returns the new tag, or None when the condition failed (someone else wrote first)."""
    import hashlib

    if is_s3(uri):
        import botocore.exceptions as bexc

        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except bexc.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                           "NoSuchKey", "412", "409"):
                return None
            raise
    import fcntl
    import tempfile

    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(uri)), prefix=".put-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if match is None:
            try:
                os.link(tmp, uri)
            except FileExistsError:
                return None
        else:
            with open(uri + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = read_tagged(uri)
                if current is None or current[1] != match:
                    return None
                os.replace(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()
