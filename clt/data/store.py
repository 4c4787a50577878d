"""Where prepared tokens live: a local folder, `gs://bucket/prefix` or `s3://bucket/prefix`, all through tensorstore.

A location is a URL (a plain path is a local folder). Objects under it are read and written through one
tensorstore kvstore per location, so the code above this module never asks which kind of storage it has:
JSON files, 1-D zarr3 arrays written block by block (`Appender`), and one batched read of many rows of a
token array (`read_rows`). S3 takes its credentials from the usual `AWS_*` variables and `AWS_ENDPOINT_URL`
for S3-compatible servers (MinIO, a local test server): tensorstore reads neither of the last two itself, they
reach it through `kvstore_spec`. GCS takes Google's application default credentials, and tensorstore's own
`TENSORSTORE_GCS_HTTP_URL` points it at an emulator.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

REMOTE_SCHEMES = ("gs://", "s3://")
# Tokens are stored raw (little-endian), in shards of 2^22 ids (8 MiB of uint16: one object per shard on a
# bucket) holding inner chunks of 2^15 ids (64 KiB): reading one sequence fetches about one inner chunk.
SHARD_ELEMENTS = 1 << 22
CHUNK_ELEMENTS = 1 << 15
# Failures against a bucket (no such bucket, no network) come back after a few seconds, not minutes.
_RETRIES = {"max_retries": 4, "initial_delay": "100ms", "max_delay": "2s"}


class StoreError(ValueError):
    """Storage that cannot be read or written; the one-line message names the location and the fix."""


def is_remote(url: str | os.PathLike) -> bool:
    return str(url).startswith(REMOTE_SCHEMES)


def join(url: str | os.PathLike, *names: str) -> str:
    """`url/name/...` for a local path or a bucket URL alike."""
    base = str(url)
    return "/".join([base.rstrip("/")] + [n.strip("/") for n in names]) if names else base


def kvstore_spec(url: str | os.PathLike) -> dict[str, Any]:
    """The tensorstore kvstore spec of a location (always a "folder": the path ends with '/')."""
    url = str(url)
    for scheme, driver in (("gs://", "gcs"), ("s3://", "s3")):
        if url.startswith(scheme):
            bucket, _, path = url[len(scheme):].partition("/")
            if not bucket:
                raise StoreError(f"{url} names no bucket: write {scheme}BUCKET/PREFIX")
            spec: dict[str, Any] = {"driver": driver, "bucket": bucket, "path": path.strip("/") + "/" if path else ""}
            if driver == "s3":
                if os.environ.get("AWS_ENDPOINT_URL"):  # path-style requests to that server
                    spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if region:  # else tensorstore asks the endpoint, then falls back to us-east-1
                    spec["aws_region"] = region
                if os.environ.get("AWS_ACCESS_KEY_ID"):
                    spec["aws_credentials"] = {"type": "environment"}
            return spec
    if "://" in url:
        raise StoreError(f"{url}: unknown storage scheme; use a local path, gs://BUCKET/PREFIX or s3://BUCKET/PREFIX")
    return {"driver": "file", "path": str(pathlib.Path(url).absolute()) + "/"}


@functools.lru_cache(maxsize=1)
def context() -> ts.Context:
    """One context per process: a shared cache of chunks read (replayed and re-read rows come from memory)."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20},
                       "s3_request_retries": dict(_RETRIES), "gcs_request_retries": dict(_RETRIES)})


def storage_error(exc: BaseException, url: str, doing: str) -> StoreError:
    """A tensorstore failure as one line: what failed where, and the likely fix."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    if "PERMISSION_DENIED" in text or "403" in text:
        hint = "the credentials lack access; check AWS_*/GOOGLE_APPLICATION_CREDENTIALS and the bucket's permissions"
    elif is_remote(url) and ("NOT_FOUND" in text or "404" in text or "NoSuchBucket" in text):
        hint = "the bucket does not exist or is not visible to these credentials; check its name"
    elif "UNAVAILABLE" in text or "DEADLINE" in text or "Connection" in text or "connect" in text:
        hint = "the storage could not be reached; check the network, AWS_ENDPOINT_URL or TENSORSTORE_GCS_HTTP_URL"
    else:
        hint = "check the location and that it is writable" if doing.startswith("writ") else "check the location"
    return StoreError(f"{doing} {url} failed ({text}): {hint}")


@functools.lru_cache(maxsize=256)
def _kvstore(url: str) -> ts.KvStore:
    try:
        return ts.KvStore.open(kvstore_spec(url), context=context()).result()
    except ValueError as e:
        raise storage_error(e, url, "opening") from e


def read_bytes(url: str, key: str) -> bytes | None:
    """The object `key` under `url`, or None when it does not exist."""
    try:
        result = _kvstore(str(url)).read(key).result()
    except ValueError as e:
        raise storage_error(e, join(url, key), "reading") from e
    return result.value if result.state == "value" else None


def write_bytes(url: str, key: str, data: bytes) -> None:
    try:
        _kvstore(str(url)).write(key, data).result()
    except ValueError as e:
        raise storage_error(e, join(url, key), "writing") from e


def read_json(url: str, key: str) -> Any | None:
    """The JSON object `key` under `url`, None when absent; invalid JSON is a StoreError naming it."""
    data = read_bytes(url, key)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{join(url, key)} is not valid JSON ({e}): re-run `clt prepare`") from e


def write_json(url: str, key: str, obj: Any) -> None:
    write_bytes(url, key, (json.dumps(obj, indent=2) + "\n").encode())


def list_keys(url: str) -> list[str]:
    """Every key under `url` (relative to it), sorted."""
    try:
        return sorted(k.decode() for k in _kvstore(str(url)).list().result())
    except ValueError as e:
        raise storage_error(e, url, "listing") from e


def delete_keys(url: str, prefix: str = "") -> None:
    """Delete every key under `url/prefix` (all of `url` when prefix is empty)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
    try:
        _kvstore(str(url)).delete_range(ts.KvStore.KeyRange(prefix, end)).result()
    except ValueError as e:
        raise storage_error(e, join(url, prefix), "deleting") from e


def _array_spec(url: str) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": kvstore_spec(url),
            # A finished array never changes: cached chunks need no revalidation round trip to the bucket.
            "recheck_cached_data": "open", "recheck_cached_metadata": "open"}


def open_array(url: str) -> ts.TensorStore:
    """A finished 1-D array for reading."""
    try:
        return ts.open(_array_spec(url), read=True, open=True, context=context()).result()
    except ValueError as e:
        raise storage_error(e, url, "opening the array") from e


def _create_array(url: str, dtype: np.dtype) -> ts.TensorStore:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    metadata = {"shape": [0], "data_type": np.dtype(dtype).name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD_ELEMENTS]}},
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [CHUNK_ELEMENTS], "codecs": raw, "index_codecs": raw + [{"name": "crc32c"}]}}]}
    spec = dict(_array_spec(url), metadata=metadata, create=True, delete_existing=True)
    try:
        return ts.open(spec, context=context()).result()
    except ValueError as e:
        raise storage_error(e, url, "creating the array") from e


class Appender:
    """A 1-D zarr3 array written front to back in whole shards: only the unwritten tail stays in memory."""

    def __init__(self, url: str, dtype: np.dtype | str):
        self.url, self.dtype = url, np.dtype(dtype)
        self._array = _create_array(url, self.dtype)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self.size = 0  # elements written to the array so far

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype)
        if values.size:
            self._pending.append(values)
            self._pending_size += values.size
        if self._pending_size >= SHARD_ELEMENTS:
            block = np.concatenate(self._pending)
            whole = block.size - block.size % SHARD_ELEMENTS
            self._write(block[:whole])
            self._pending = [block[whole:]] if whole < block.size else []
            self._pending_size = block.size - whole

    def _write(self, block: np.ndarray) -> None:
        end = self.size + block.size
        try:
            self._array = self._array.resize(exclusive_max=[end], expand_only=True).result()
            self._array[self.size:end].write(block).result()
        except ValueError as e:
            raise storage_error(e, self.url, "writing") from e
        self.size = end

    def close(self) -> int:
        """Write the tail; returns the array's length."""
        if self._pending_size:
            self._write(np.concatenate(self._pending))
            self._pending, self._pending_size = [], 0
        return self.size


def read_rows(array: ts.TensorStore, starts: Sequence[int] | np.ndarray, length: int) -> ts.Future:
    """Start one batched, concurrent read of array[s : s + length] for every s: a future of [len(starts), length]."""
    rows = [array[int(s):int(s) + length].translate_to[0] for s in starts]
    return ts.stack(rows).read()
