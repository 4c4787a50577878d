"""Local object stores for tests: an S3-compatible server (moto, server mode) and a GCS emulator
(gcp-storage-emulator), both on 127.0.0.1, reached through tensorstore's own `s3` and `gcs` kvstore drivers.

Import the fixtures into a test module (no conftest changes needed):

    from objstores import gcs_store, s3_store

Both fixtures are session-scoped, yield an `ObjectStore` (scheme, endpoint, bucket, env) and put back every
environment variable they set when the session ends. Each skips, with the reason, when its package is missing.

clt reaches them the way it reaches real buckets (`clt.data.store.kvstore_spec`): AWS_ENDPOINT_URL for S3, and
tensorstore's TENSORSTORE_GCS_HTTP_URL for GCS (its gcs spec has no endpoint member).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest


@dataclasses.dataclass
class ObjectStore:
    """A running local object store. `url("a", "b")` -> "s3://BUCKET/a/b" (or gs://...)."""

    scheme: str  # "s3" or "gs"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created, empty at start
    env: dict[str, str]  # environment variables the fixture set (restored at the end of the session)
    start_s: float  # seconds from launch until the store answered and had its bucket
    # s3 only: set_iam(True) makes moto check credentials and IAM policies on every request, set_iam(False) undoes it
    set_iam: Callable[[bool], None] | None = None

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *[p.strip("/") for p in parts]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {url} after {timeout}s") from None
            time.sleep(0.05)


S3_BUCKET = "clt-test"
GCS_BUCKET = "clt-test"


@contextlib.contextmanager
def moto_server(bucket: str = S3_BUCKET) -> Iterator[ObjectStore]:
    """moto in server mode (a subprocess, `python -m moto.server -H 127.0.0.1 -p PORT`) with `bucket` created.

    Sets AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (any values: moto accepts all while IAM is off), AWS_REGION,
    AWS_DEFAULT_REGION=us-east-1 and AWS_ENDPOINT_URL while it runs (benchmarks/data.py uses it too)."""
    t0 = time.perf_counter()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"{endpoint}/moto-api/", proc)

        def set_iam(on: bool) -> None:
            # moto checks signatures and IAM policies once its request count reaches this number (0 = now).
            body = b"0" if on else b"inf"
            req = urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=body, method="POST", headers={"Content-Type": "text/plain"}
            )
            urllib.request.urlopen(req, timeout=10).read()

        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        with _environ(env):
            # Plain path-style PUT: moto accepts unsigned requests while IAM checks are off.
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).read()
            yield ObjectStore("s3", endpoint, bucket, env, time.perf_counter() - t0, set_iam)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_store() -> Iterator[ObjectStore]:
    """A local S3 server for the session (`moto_server`); skipped without moto[server]."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    with moto_server() as s3:
        yield s3


def _patch_gcs_emulator() -> Callable[[], None]:
    """Make gcp-storage-emulator answer like GCS where tensorstore depends on it; returns the undo.

    - object listing: tensorstore lists a key range with ``startOffset``/``endOffset`` (not ``prefix``); the
      emulator ignores both and lists the whole bucket, so the listing is filtered to that range here;
    - suffix ranges (``Range: bytes=-N``, used for the shard index at the end of a zarr3 shard): the emulator
      ignores them and sends the whole object, which tensorstore rejects with
      "Requested byte range [-N, ?) was ignored by server"; they are rewritten to ``bytes=SIZE-N-``;
    - media downloads get the ``x-goog-generation`` header (without it every object reads as generation 0).
    Conditional requests (ifGenerationMatch/NotMatch) stay ignored: fine for one writer at a time."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original_download, original_ls = objects.download, objects.ls

    def download(request, response, storage, *args, **kwargs):
        try:
            meta = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            meta = None
        headers = request._request_handler.headers
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("range") or "")
        if meta is not None and suffix:
            start = max(0, int(meta["size"]) - int(suffix.group(1)))
            headers.replace_header("range", f"bytes={start}-")
        result = original_download(request, response, storage, *args, **kwargs)
        if meta is not None and meta.get("generation") is not None:
            response["x-goog-generation"] = str(meta["generation"])
        return result

    def ls(request, response, storage, *args, **kwargs):
        result = original_ls(request, response, storage, *args, **kwargs)
        lo = (request.query.get("startOffset") or [""])[0]
        hi = (request.query.get("endOffset") or [None])[0]
        if (lo or hi) and response.status == 200:
            listing = json.loads(response._content)
            names = listing.get("items") or []
            listing["items"] = [o for o in names if o["name"] >= lo and (hi is None or o["name"] < hi)]
            response.json(listing)
        return result

    swaps = {original_download: download, original_ls: ls}

    def apply(table: dict) -> None:
        for _, handlers in server.HANDLERS:
            for method, fn in handlers.items():
                if fn in table:
                    handlers[method] = table[fn]
        for name in ("download", "ls"):
            if getattr(objects, name) in table:
                setattr(objects, name, table[getattr(objects, name)])

    apply(swaps)
    return lambda: apply({v: k for k, v in swaps.items()})


@pytest.fixture(scope="session")
def gcs_store() -> Iterator[ObjectStore]:
    """gcp-storage-emulator (in this process, in memory, one thread) with bucket GCS_BUCKET.

    Sets TENSORSTORE_GCS_HTTP_URL (tensorstore's gcs server) and STORAGE_EMULATOR_HOST (google-cloud-storage's) to
    the emulator, and GOOGLE_AUTH_TOKEN_FOR_TESTING so tensorstore sends a fixed token instead of looking for
    credentials (the emulator checks none)."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    from gcp_storage_emulator.server import create_server

    log = logging.getLogger("gcp_storage_emulator")
    level = log.level
    log.setLevel(logging.CRITICAL)  # it logs every missing object as an error
    undo = _patch_gcs_emulator()
    t0 = time.perf_counter()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    start_s = time.perf_counter() - t0
    env = {
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "STORAGE_EMULATOR_HOST": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "clt-test-token",
    }
    try:
        with _environ(env):
            yield ObjectStore("gs", endpoint, GCS_BUCKET, env, start_s)
    finally:
        server.stop()
        undo()
        log.setLevel(level)
