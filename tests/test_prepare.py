"""`clt prepare` on corpora: every input format gives the same store, N workers give the same bytes as one,
an interrupted prepare resumes, bad input is one line with nothing left behind, and the store itself (format 2
on tensorstore, format 1 still readable) reads back the token stream exactly."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clt.data import prepare, store
from clt.data.prepare import PrepareError
from clt.data.shards import DomainData, Shard, ShardError, write_shard
from clt.data.tokenizer import ByteTokenizer, document_ids

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Unicode, several lines, a tab, quotes: what JSON escaping and Parquet strings must carry through unchanged.
DOCS = [f"Document {i}: naïve café — {'λ' * (i % 5)} line one\n\tline \"two\" of {i}\n" + "word " * (i % 13)
        for i in range(60)]


def _tree(root: pathlib.Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shards_only(root: pathlib.Path) -> dict:
    """The token store without prepare.json (whose `sources` names the inputs)."""
    return {k: v for k, v in _tree(root).items() if k != "prepare.json"}


def _jsonl(path: pathlib.Path, docs=DOCS, field="text") -> pathlib.Path:
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines))
    elif path.suffix == ".zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        path.write_bytes(lines)
    return path


def _run(kind, inputs, out, **kw):
    kw.setdefault("progress", False)
    return prepare.prepare(kind, [str(i) for i in inputs], domain="d", out=str(out), **kw)


# ----------------------------------------------------------------------------------------------------------
# Inputs: the same documents in any format give the same store.
# ----------------------------------------------------------------------------------------------------------
def test_every_input_format_gives_the_same_store(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, d in enumerate(DOCS):
        (texts / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    _run("text", [texts / "*.txt"], tmp_path / "from_text")
    reference = _shards_only(tmp_path / "from_text")
    assert DomainData(tmp_path / "from_text").train.num_docs + DomainData(tmp_path / "from_text").eval.num_docs == 60

    _run("jsonl", [_jsonl(tmp_path / "c.jsonl")], tmp_path / "from_jsonl")
    _run("jsonl", [_jsonl(tmp_path / "c.jsonl.gz")], tmp_path / "from_gz")
    _run("jsonl", [_jsonl(tmp_path / "c.jsonl.zst")], tmp_path / "from_zst")
    table = pa.table({"id": list(range(60)), "text": DOCS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)  # several row groups, cut into parts
    _run("parquet", [tmp_path / "c.parquet"], tmp_path / "from_parquet", part_bytes=300)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf_dataset"))
    _run("parquet", [tmp_path / "hf_dataset"], tmp_path / "from_datasets")
    for name in ("from_jsonl", "from_gz", "from_zst", "from_parquet", "from_datasets"):
        assert _shards_only(tmp_path / name) == reference, name


# ----------------------------------------------------------------------------------------------------------
# Parallel preparation and resume.
# ----------------------------------------------------------------------------------------------------------
def _corpus(tmp_path: pathlib.Path, n_files: int = 3) -> list[pathlib.Path]:
    rng = np.random.default_rng(0)
    files = []
    for f in range(n_files):
        docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "délta", "ε"], size=rng.integers(5, 80)))
                for _ in range(70)]
        files.append(_jsonl(tmp_path / f"part{f}.jsonl", docs))
    return files


def test_four_workers_write_the_same_bytes_as_one(tmp_path):
    files = _corpus(tmp_path)
    one = _run("jsonl", files, tmp_path / "one", part_bytes=4096)
    four = _run("jsonl", files, tmp_path / "four", part_bytes=4096, workers=4)
    assert _tree(tmp_path / "four") == _tree(tmp_path / "one")
    assert one["train"] == four["train"] and one["train"]["docs"] + one["eval"]["docs"] == 210
    # Many parts, not one: the test would pass trivially if the corpus were a single part.
    assert len(prepare.inputs.plan_parts("jsonl", [str(f) for f in files], part_bytes=4096)) >= 6


@pytest.mark.parametrize("eval_fraction", [0.0, 0.999999])
def test_a_split_left_empty_gets_the_same_document_however_the_parts_fall(tmp_path, eval_fraction):
    """With no document drawing eval (or all of them), the extreme draw moves split, even when it sits in
    the middle of a later part."""
    files = _corpus(tmp_path, n_files=2)
    whole = _run("jsonl", files, tmp_path / "whole", eval_fraction=eval_fraction)
    parts = _run("jsonl", files, tmp_path / "parts", eval_fraction=eval_fraction, part_bytes=2048)
    assert _tree(tmp_path / "parts") == _tree(tmp_path / "whole")
    small = "eval" if eval_fraction == 0.0 else "train"
    assert whole[small]["docs"] == 1 and parts[small]["docs"] == 1
    draws = [prepare._eval_draw("d", json.loads(line)["text"]) for f in files for line in f.read_text().splitlines()]
    moved = int(np.argmin(draws) if small == "eval" else np.argmax(draws))
    text = json.loads([line for f in files for line in f.read_text().splitlines()][moved])["text"]
    shard = DomainData(tmp_path / "whole").__getattribute__(small)
    assert ByteTokenizer().decode(shard.read_tokens(0, shard.num_tokens - 1)) == text


def test_an_interrupted_prepare_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    files = _corpus(tmp_path)
    _run("jsonl", files, tmp_path / "clean", part_bytes=4096)
    calls = []
    real = prepare.tokenize_part

    def interrupted(job, progress=None):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(job.number)
        return real(job, progress)

    monkeypatch.setattr(prepare, "tokenize_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("jsonl", files, tmp_path / "out", part_bytes=4096)
    assert not (tmp_path / "out").exists()  # nothing that looks like a domain
    assert (tmp_path / ".out.partial" / "parts" / "000003" / "part.json").is_file()

    calls.clear()
    monkeypatch.setattr(prepare, "tokenize_part", lambda job, progress=None: (calls.append(job.number),
                                                                            real(job, progress))[1])
    _run("jsonl", files, tmp_path / "out", part_bytes=4096)
    assert calls and min(calls) == 4  # parts 0-3 were reused, not tokenized again
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")
    assert not (tmp_path / ".out.partial").exists()


def test_changed_inputs_restart_instead_of_resuming(tmp_path, monkeypatch):
    files = _corpus(tmp_path, n_files=2)
    real = prepare.tokenize_part
    monkeypatch.setattr(prepare, "tokenize_part",
                        lambda job, progress=None: real(job, progress) if job.number < 2 else (_ for _ in ()).throw(
                            KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run("jsonl", files, tmp_path / "out", part_bytes=4096)
    monkeypatch.setattr(prepare, "tokenize_part", real)
    _jsonl(files[0], ["an edited first file"] * 5)
    summary = _run("jsonl", files, tmp_path / "out", part_bytes=4096)
    _run("jsonl", files, tmp_path / "clean", part_bytes=4096)
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")
    assert summary["train"]["docs"] + summary["eval"]["docs"] == 75


def test_sigkill_mid_prepare_never_leaves_a_domain_that_looks_complete(tmp_path):
    docs = [f"document {i} " + "text " * 400 for i in range(4000)]
    corpus = _jsonl(tmp_path / "big.jsonl", docs)
    cmd = [sys.executable, "-m", "clt.cli", "prepare", "jsonl", str(corpus), "--domain", "d", "--quiet",
           "--part-mb", "0.5", "--out"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    clean = subprocess.run(cmd + [str(tmp_path / "clean")], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    parts = tmp_path / ".out.partial" / "parts"
    for finished in (2, 9):  # killed after 2 parts, then (resuming) after 9 of the 16
        proc = subprocess.Popen(cmd + [str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while len(list(parts.glob("*/part.json"))) < finished and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not (tmp_path / "out").exists()
    again = subprocess.run(cmd + [str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")
    assert not (tmp_path / ".out.partial").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming what and where, exit 2, nothing partial left behind.
# ----------------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clt.cli", "prepare", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_jsonl_lines_are_reported_or_skipped(tmp_path):
    good = [json.dumps({"text": f"doc {i}"}) for i in range(6)]
    lines = good[:3] + ['{"text": "unterminated'] + good[3:] + ['{"body": "no text field"}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    _assert_one_line_error(_cli("jsonl", str(tmp_path / "c.jsonl"), "--domain", "d", "--out", str(out)),
                           "c.jsonl line 4", "--skip-bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no output, no staging
    skipped = _cli("jsonl", str(tmp_path / "c.jsonl"), "--domain", "d", "--out", str(out), "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 2 bad record(s)" in skipped.stderr and "line 4" in skipped.stderr
    data = DomainData(out)
    assert data.train.num_docs + data.eval.num_docs == 6
    assert json.loads((out / "prepare.json").read_text())["skipped"] == 2


def test_a_missing_field_names_the_fields_there_are(tmp_path):
    _jsonl(tmp_path / "c.jsonl", field="body")
    _assert_one_line_error(_cli("jsonl", str(tmp_path / "c.jsonl"), "--domain", "d", "--out", str(tmp_path / "o")),
                           "c.jsonl line 1", "'text'", "body", "--field")
    ok = _cli("jsonl", str(tmp_path / "c.jsonl"), "--domain", "d", "--out", str(tmp_path / "o"), "--field", "body")
    assert ok.returncode == 0, ok.stderr


def test_an_empty_corpus_and_a_glob_matching_nothing_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    _assert_one_line_error(_cli("jsonl", str(tmp_path / "empty.jsonl"), "--domain", "d", "--out",
                                str(tmp_path / "o")), "0 document(s)")
    _assert_one_line_error(_cli("jsonl", str(tmp_path / "*.json"), "--domain", "d", "--out", str(tmp_path / "o")),
                           "*.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_a_prepare_that_fails_keeps_the_old_domain(tmp_path):
    _jsonl(tmp_path / "c.jsonl")
    _run("jsonl", [tmp_path / "c.jsonl"], tmp_path / "out")
    before = _tree(tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(PrepareError, match="bad.jsonl line 2"):
        _run("jsonl", [tmp_path / "c.jsonl", tmp_path / "bad.jsonl"], tmp_path / "out")
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "c.jsonl", "out"]


# ----------------------------------------------------------------------------------------------------------
# The store: format 2 reads back exactly, format 1 stays readable.
# ----------------------------------------------------------------------------------------------------------
def test_rows_read_back_exactly_across_many_store_shards(tmp_path, monkeypatch):
    """Small store shards and chunks (so a row spans several of each) against the stream kept in numpy."""
    monkeypatch.setattr(store, "SHARD_ELEMENTS", 64)
    monkeypatch.setattr(store, "CHUNK_ELEMENTS", 16)
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 256, size=rng.integers(1, 90)), 256) for _ in range(40)]
    write_shard(tmp_path / "s", ((d, len(d)) for d in docs), vocab_size=257, eos_id=256, bos_id=None,
                tokenizer_name="byte")
    stream = np.concatenate(docs)
    shard = Shard(tmp_path / "s")
    assert shard.num_tokens == len(stream) and len(list((tmp_path / "s" / "tokens" / "c").iterdir())) > 10
    np.testing.assert_array_equal(shard.read_tokens(0, shard.num_tokens), stream)
    np.testing.assert_array_equal(shard.doc_offsets, np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    L = 37
    idx = rng.integers(0, shard.num_sequences(L), size=(3, 5))
    expected = stream[idx[..., None] * L + np.arange(L + 1)]
    np.testing.assert_array_equal(shard.sequences(idx, L), expected)
    assert shard.sequences(idx, L).dtype == np.int32
    shard.verify()


def _write_format_1(path: pathlib.Path, docs: list[np.ndarray], doc_bytes: list[int]) -> None:
    """A clt 0.1 shard, written here byte by byte as that version did (so the test does not use the reader's
    own idea of the format)."""
    import hashlib

    path.mkdir(parents=True)
    stream = np.concatenate(docs).astype("<u2")
    (path / "tokens.bin").write_bytes(stream.tobytes())
    np.save(path / "docs.npy", np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    np.save(path / "doc_bytes.npy", np.array(doc_bytes, np.int64))
    (path / "index.json").write_text(json.dumps(dict(
        format=1, dtype="uint16", num_tokens=len(stream), num_docs=len(docs), num_bytes=sum(doc_bytes),
        vocab_size=257, eos_id=256, bos_id=None, tokenizer="byte", tokenizer_sha256="byte",
        sha256=hashlib.sha256(stream.tobytes()).hexdigest())))


def test_format_1_shards_stay_readable_and_match_format_2(tmp_path):
    tok = ByteTokenizer()
    texts = ["first document", "second one, a bit longer", "third"]
    docs = [document_ids(tok, t) for t in texts]
    sizes = [len(t.encode()) for t in texts]
    _write_format_1(tmp_path / "old", docs, sizes)
    write_shard(tmp_path / "new", zip(docs, sizes), vocab_size=257, eos_id=256, bos_id=None, tokenizer_name="byte",
                tokenizer_fingerprint="byte")
    old, new = Shard(tmp_path / "old"), Shard(tmp_path / "new")
    assert (old.format, new.format) == (1, 2)
    idx = np.array([0, 2, 1])
    np.testing.assert_array_equal(old.sequences(idx, 10), new.sequences(idx, 10))
    np.testing.assert_array_equal(old.doc_offsets, new.doc_offsets)
    assert old._index["sha256"] == new._index["sha256"]  # the same stream hashes the same in both formats
    old.verify()
    (tmp_path / "old" / "tokens.bin").write_bytes(b"\0" * (2 * old.num_tokens))
    with pytest.raises(ShardError, match="do not match the sha256"):
        Shard(tmp_path / "old").verify()


def test_a_ray_cluster_writes_the_same_bytes_as_one_process(tmp_path):
    pytest.importorskip("ray")
    files = [str(f) for f in _corpus(tmp_path)]
    base = [sys.executable, "-m", "clt.cli", "prepare", "jsonl", *files, "--domain", "d", "--quiet",
            "--part-mb", "0.004", "--out"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    for out, extra in (("one", []), ("ray", ["--ray", "local"])):
        result = subprocess.run(base + [str(tmp_path / out), *extra], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert _tree(tmp_path / "ray") == _tree(tmp_path / "one")


def test_domains_of_different_tokenizers_are_refused_naming_the_store(tmp_path, demo_data):
    """Same ids, another tokenizer file: the fingerprints differ, and the error names the domain and its path."""
    pytest.importorskip("tokenizers")
    from clt import config
    from clt.config import ConfigError
    from clt.data.pipeline import load_domains
    from clt.data.tokenizer import write_hf_tokenizer
    from conftest import SMOKE

    (tmp_path / "tok").mkdir()
    write_hf_tokenizer("byte", tmp_path / "tok")
    _jsonl(tmp_path / "c.jsonl")
    _run("jsonl", [tmp_path / "c.jsonl"], tmp_path / "web", tokenizer=str(tmp_path / "tok"))
    domains = {"prose": str(demo_data / "prose"), "code": str(tmp_path / "web")}
    cfg = config.load(str(SMOKE), [f"data.domains={domains!r}"])
    with pytest.raises(ConfigError, match=r"^data.domains.code = '.*web': prepared with tokenizer .*tok \(\w+\), but "
                                          r"data.domains.prose with byte \(byte\); prepare every domain"):
        load_domains(cfg)
