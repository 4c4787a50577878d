"""Data in buckets: `clt prepare --out s3://...|gs://...` and runs that read their domains from a bucket, against a
local S3-compatible server (moto) and a GCS emulator, with tensorstore's own s3 and gcs drivers."""

import json
import os
import subprocess
import sys
import time

import pytest

from clt import config, train
from clt.data import prepare, store
from clt.data.prepare import PrepareError
from clt.data.shards import DomainData
from conftest import ROOT, SMOKE
from test_checkpoint import comparable_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    return request.getfixturevalue("s3_store" if request.param == "s3" else "gcs_store")


def test_a_run_reads_its_domains_from_a_bucket_with_the_losses_of_local_disk(bucket, demo_data, smoke_run, tmp_path):
    """The demo domains prepared straight into the bucket hold the same tokens as on disk, and the smoke run
    trained from the bucket logs exactly what the run from local disk logged."""
    remote = bucket.url("demo")
    prepare.prepare_demo(remote, progress=False, max_bytes=150_000)  # as conftest's demo_data
    for d in ("prose", "code"):
        assert DomainData(store.join(remote, d)).manifest_hash() == DomainData(demo_data / d).manifest_hash()
    assert not [k for k in store.list_keys(remote) if ".partial" in k]  # the staging parts are gone
    cfg, local_wd, _ = smoke_run
    domains = {d: store.join(remote, d) for d in ("prose", "code")}
    remote_cfg = config.load(str(SMOKE), [f"data.domains={domains!r}"])
    train.train(remote_cfg, str(tmp_path / "wd"), progress=False)
    assert comparable_metrics(tmp_path / "wd") == comparable_metrics(local_wd)


def test_prepare_jsonl_into_a_bucket_resumes_after_an_interrupt(s3_store, tmp_path, monkeypatch):
    lines = "".join(json.dumps({"text": f"document {i} " + "word " * (i % 17)}) + "\n" for i in range(300))
    (tmp_path / "c.jsonl").write_text(lines)
    url = s3_store.url("resume", "web")
    real = prepare.tokenize_part
    monkeypatch.setattr(prepare, "tokenize_part",
                        lambda job, progress=None: real(job, progress) if job.number < 2 else (_ for _ in ()).throw(
                            KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("jsonl", [str(tmp_path / "c.jsonl")], domain="web", out=url, progress=False, part_bytes=2048)
    with pytest.raises(Exception, match="no prepared shard"):
        DomainData(url)  # parts wait under .partial/, nothing looks like a domain
    calls = []
    monkeypatch.setattr(prepare, "tokenize_part", lambda job, progress=None: (calls.append(job.number),
                                                                            real(job, progress))[1])
    prepare.prepare("jsonl", [str(tmp_path / "c.jsonl")], domain="web", out=url, progress=False, part_bytes=2048)
    assert min(calls) == 2  # parts 0 and 1 were reused from the bucket
    prepare.prepare("jsonl", [str(tmp_path / "c.jsonl")], domain="web", out=str(tmp_path / "local"), progress=False,
                    part_bytes=2048)
    assert DomainData(url).manifest_hash() == DomainData(tmp_path / "local").manifest_hash()
    assert sorted({k.split("/")[0] for k in store.list_keys(url)}) == ["eval", "prepare.json", "train"]


def test_a_bucket_prefix_holding_other_files_is_not_overwritten(s3_store, tmp_path):
    url = s3_store.url("foreign")
    store.write_bytes(url, "notes.txt", b"not clt's")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    with pytest.raises(PrepareError, match=r"refusing to write .*notes.txt"):
        prepare.prepare("text", [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], domain="d", out=url,
                        progress=False)
    assert store.list_keys(url) == ["notes.txt"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clt.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), timeout=120)


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_missing_bucket_a_denied_bucket_and_no_server_are_one_line_errors(s3_store, tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    args = ["prepare", "text", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--domain", "d", "--out"]
    _one_line(_cli(*args, "s3://no-such-bucket/d"), "s3://no-such-bucket/d", "bucket does not exist")
    s3_store.set_iam(True)  # moto now checks credentials and policies: these have none
    try:
        _one_line(_cli(*args, s3_store.url("denied")), s3_store.url("denied"), "credentials lack access")
    finally:
        s3_store.set_iam(False)
    t0 = time.perf_counter()
    _one_line(_cli(*args, "s3://clt-test/d", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
              "could not be reached")
    assert time.perf_counter() - t0 < 60  # bounded retries, not tensorstore's default quarter of an hour
    # A config pointing at a missing bucket: clt train says so before building anything.
    domains = {"prose": "s3://no-such-bucket/prose", "code": "s3://no-such-bucket/code"}
    _one_line(_cli("train", str(ROOT / "configs" / "smoke.py"), f"data.domains={domains!r}", "--workdir",
                   str(tmp_path / "wd")), "no-such-bucket", "bucket does not exist")


def test_locations_map_to_tensorstore_kvstores(monkeypatch, tmp_path):
    for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(var, raising=False)
    assert store.kvstore_spec("s3://b/a/b/") == {"driver": "s3", "bucket": "b", "path": "a/b/"}
    assert store.kvstore_spec("gs://b") == {"driver": "gcs", "bucket": "b", "path": ""}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000/")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    assert store.kvstore_spec("s3://b/p") == {"driver": "s3", "bucket": "b", "path": "p/", "endpoint": "http://minio:9000",
                                              "aws_region": "eu-west-1", "aws_credentials": {"type": "environment"}}
    monkeypatch.chdir(tmp_path)
    assert store.kvstore_spec("data/web") == {"driver": "file", "path": f"{tmp_path}/data/web/"}
    for bad, why in (("s3:///p", "names no bucket"), ("hdfs://x/y", "unknown storage scheme")):
        with pytest.raises(store.StoreError, match=why):
            store.kvstore_spec(bad)
    assert store.join("gs://b/p/", "train", "index.json") == "gs://b/p/train/index.json"


def test_a_failed_prepare_into_a_bucket_keeps_the_old_domain_and_leaves_no_parts(s3_store, tmp_path):
    good = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20))
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "bad.jsonl").write_text(good + "{not json\n")
    url = s3_store.url("failed", "web")
    prepare.prepare("jsonl", [str(tmp_path / "good.jsonl")], domain="web", out=url, progress=False)
    before = DomainData(url).manifest_hash()
    with pytest.raises(PrepareError, match=r"bad.jsonl line 21: not valid JSON"):
        prepare.prepare("jsonl", [str(tmp_path / "bad.jsonl")], domain="web", out=url, progress=False)
    assert DomainData(url).manifest_hash() == before
    assert not [k for k in store.list_keys(url) if k.startswith(".partial")]
