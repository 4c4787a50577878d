"""Tokenizers, the shard format, `prepare_text` and the demo domains."""

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clt.data import prepare
from clt.data.prepare import PrepareError, prepare_demo, prepare_text
from clt.data import store
from clt.data.shards import DomainData, Shard, ShardError, write_shard
from clt.data.tokenizer import ByteTokenizer, TokenizerError, document_ids, load_tokenizer, write_hf_tokenizer

EOS = 10
VOCAB = 11
# Three documents; their stream is 1 2 3 E 4 5 E 6 7 8 9 E (E = EOS = 10), 12 tokens.
DOCS = [[1, 2, 3, EOS], [4, 5, EOS], [6, 7, 8, 9, EOS]]
DOC_BYTES = [3, 2, 5]


def _write(path, docs=DOCS, doc_bytes=DOC_BYTES, vocab_size=VOCAB, eos_id=EOS):
    return write_shard(path, zip(docs, doc_bytes), vocab_size=vocab_size, eos_id=eos_id, bos_id=None,
                       tokenizer_name="test")


def _documents(shard: Shard) -> list[str]:
    """The shard's documents as text; each must end with EOS."""
    tok, offsets = ByteTokenizer(), shard.doc_offsets
    tokens = shard.read_tokens(0, shard.num_tokens)
    assert all(tokens[end - 1] == shard.eos_id for end in offsets[1:])
    return [tok.decode(tokens[start:end]) for start, end in zip(offsets[:-1], offsets[1:])]


def _folder_bytes(root: pathlib.Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_utf8():
    tok = load_tokenizer("byte")
    text = "héllo wörld ✓ 🚀\n"
    ids = tok.encode(text)
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    doc = document_ids(tok, text)
    assert doc[-1] == tok.eos_id == 256 and len(doc) == len(ids) + 1  # no BOS
    assert tok.decode(doc) == text  # EOS is skipped
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # invalid UTF-8 is replaced, not raised
    assert (tok.name, tok.vocab_size, tok.bos_id) == ("byte", 257, None)


def _tiny_hf_tokenizer(path, specials):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, **{s: i + 1 for i, s in enumerate(specials)}}
    vocab.update({w: len(vocab) + i for i, w in enumerate(["hello", "world"])})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return vocab


def test_hf_tokenizer_finds_eos_and_bos(tmp_path):
    path = tmp_path / "tokenizer.json"
    vocab = _tiny_hf_tokenizer(path, ["</s>", "<s>"])
    tok = load_tokenizer(str(path))
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.bos_id) == (str(path), len(vocab), 1, 2)
    assert list(tok.encode("hello world")) == [vocab["hello"], vocab["world"]]
    doc = document_ids(tok, "hello world")
    assert list(doc) == [2, vocab["hello"], vocab["world"], 1]
    assert tok.decode(doc) == "hello world"


def test_prepare_text_with_an_hf_tokenizer_adds_bos_and_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    vocab = _tiny_hf_tokenizer(path, ["</s>", "<s>"])
    files = _text_files(tmp_path / "in", n=2)
    for i, f in enumerate(files):
        pathlib.Path(f).write_text("hello world " * (i + 1))
    prepare_text(files, domain="d", tokenizer=str(path), out=str(tmp_path / "out"), progress=False)
    data = DomainData(tmp_path / "out")
    assert data.tokenizer == str(path) and data.vocab_size == len(vocab)
    docs = sorted([list(s.read_tokens(0, s.num_tokens)) for s in (data.train, data.eval)], key=len)
    assert docs == [[2, vocab["hello"], vocab["world"], 1], [2] + [vocab["hello"], vocab["world"]] * 2 + [1]]


def test_hf_tokenizer_without_eos_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    _tiny_hf_tokenizer(path, ["<s>"])
    with pytest.raises(TokenizerError, match=r"none of the EOS tokens .*add one of them"):
        load_tokenizer(str(path))


def test_missing_tokenizer_file_is_an_error(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(TokenizerError, match=r"nope\.json' does not exist: pass 'byte'"):
        load_tokenizer(str(tmp_path / "nope.json"))


# ----------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------
def test_sequences_are_cut_from_the_stream_at_load_time(tmp_path):
    _write(tmp_path / "s")
    shard = Shard(tmp_path / "s")
    assert shard.num_sequences(3) == 3  # (12 - 1) // 3
    np.testing.assert_array_equal(shard.sequences(np.array([0, 2, 1]), 3),
                                  [[1, 2, 3, 10], [10, 6, 7, 8], [10, 4, 5, 10]])
    assert shard.sequences([0], 3).dtype == np.int32
    # The same shard serves another sequence length.
    assert shard.num_sequences(4) == 2
    np.testing.assert_array_equal(shard.sequences([1], 4), [[4, 5, 10, 6, 7]])
    assert shard.num_sequences(11) == 1 and shard.num_sequences(12) == 0
    np.testing.assert_array_equal(shard.sequences([0], 11), [[1, 2, 3, 10, 4, 5, 10, 6, 7, 8, 9, 10]])


def test_sequences_out_of_range_is_an_index_error_with_the_values(tmp_path):
    _write(tmp_path / "s")
    shard = Shard(tmp_path / "s")
    with pytest.raises(IndexError, match=r"\[3, -1\] out of range \[0, 3\) for seq_len 3"):
        shard.sequences([0, 3, -1], 3)


def test_documents_are_separated_by_eos_and_counted(tmp_path):
    index = _write(tmp_path / "s")
    shard = Shard(tmp_path / "s")
    np.testing.assert_array_equal(shard.read_tokens(0, shard.num_tokens), [1, 2, 3, 10, 4, 5, 10, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(shard.doc_offsets, [0, 4, 7, 12])
    np.testing.assert_array_equal(shard.doc_bytes, DOC_BYTES)
    assert (shard.num_tokens, shard.num_docs, shard.num_bytes) == (12, 3, 10)
    assert shard.bytes_per_token == pytest.approx(10 / 12)
    assert (shard.vocab_size, shard.eos_id, shard.bos_id, shard.tokenizer) == (VOCAB, EOS, None, "test")
    assert index["num_tokens"] == 12 and len(index["sha256"]) == 64


@pytest.mark.parametrize("vocab_size, dtype", [(257, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_token_dtype_is_the_smallest_that_fits(tmp_path, vocab_size, dtype):
    top = vocab_size - 1
    _write(tmp_path / "s", docs=[[top, 0, top]], doc_bytes=[4], vocab_size=vocab_size, eos_id=top)
    shard = Shard(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "index.json").read_text())["dtype"] == dtype
    assert store.open_array(str(tmp_path / "s" / "tokens")).dtype.numpy_dtype == np.dtype(dtype)
    np.testing.assert_array_equal(shard.read_tokens(0, shard.num_tokens), [top, 0, top])  # the largest id survives the round trip


def test_vocab_overflow_fails_cleanly_and_keeps_the_old_shard(tmp_path):
    _write(tmp_path / "s")
    before = _folder_bytes(tmp_path)
    with pytest.raises(ShardError, match=r"document 1 has token ids \[11, 12\] outside the vocabulary \[0, 11\)"):
        _write(tmp_path / "s", docs=[[1, EOS], [12, 11, EOS]], doc_bytes=[1, 2])
    assert _folder_bytes(tmp_path) == before  # old shard intact, no temporary folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    with pytest.raises(ShardError, match=r"token ids \[-1\] outside"):
        _write(tmp_path / "new", docs=[[-1, EOS]], doc_bytes=[1])
    assert not (tmp_path / "new").exists()


def test_empty_or_malformed_documents_are_errors(tmp_path):
    with pytest.raises(ShardError, match=r"no documents to write to .*empty"):
        _write(tmp_path / "s", docs=[], doc_bytes=[])
    with pytest.raises(ShardError, match=r"document 0 has shape \(0,\)"):
        _write(tmp_path / "s", docs=[[]], doc_bytes=[0])
    with pytest.raises(ShardError, match=r"document 0 ends with 3, not EOS 10"):
        _write(tmp_path / "s", docs=[[1, 3]], doc_bytes=[2])
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_to_replace_a_folder_that_is_not_a_shard(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("keep me")
    with pytest.raises(ShardError, match=r"refusing to replace .*\['notes.txt'\]"):
        _write(tmp_path / "s")
    assert (tmp_path / "s" / "notes.txt").read_text() == "keep me"


def test_missing_shard_says_to_run_prepare(tmp_path):
    with pytest.raises(ShardError, match=r"no prepared shard at .*nowhere.*run `clt prepare`"):
        Shard(tmp_path / "nowhere")
    with pytest.raises(ShardError, match=r"no prepared domain at .*nowhere.*run `clt prepare`"):
        DomainData(tmp_path / "nowhere")


def test_shards_pickle_by_path_not_by_contents(tmp_path):
    _write(tmp_path / "s", docs=[list(range(1000)) + [EOS]], doc_bytes=[1000], vocab_size=1001)
    _write(tmp_path / "d" / "train")
    _write(tmp_path / "d" / "eval")
    shard = Shard(tmp_path / "s")
    blob = pickle.dumps(shard)
    assert len(blob) < 500  # the 2 KB token stream is not in it
    np.testing.assert_array_equal(pickle.loads(blob).sequences([3], 10), shard.sequences([3], 10))
    data = pickle.loads(pickle.dumps(DomainData(tmp_path / "d")))
    assert data.manifest_hash() == DomainData(tmp_path / "d").manifest_hash()


def test_damaged_token_array_is_detected(tmp_path):
    _write(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps(dict(index, num_tokens=11)))  # array and index disagree
    with pytest.raises(ShardError, match=r"tokens has shape \(12,\), the index says \(11,\)"):
        Shard(tmp_path / "s")


def test_manifest_hash_follows_the_contents(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    _write(tmp_path / "c", docs=[[1, 2, 3, EOS], [4, 5, EOS], [6, 7, 8, 8, EOS]])  # one token differs
    a, b, c = Shard(tmp_path / "a"), Shard(tmp_path / "b"), Shard(tmp_path / "c")
    assert a.manifest_hash() == b.manifest_hash()
    assert a.manifest_hash() != c.manifest_hash()
    assert a.manifest()["num_tokens"] == 12
    c.verify()
    shutil.rmtree(tmp_path / "c" / "tokens")
    shutil.copytree(tmp_path / "a" / "tokens", tmp_path / "c" / "tokens")  # same shape, other tokens
    with pytest.raises(ShardError, match="do not match the sha256"):
        Shard(tmp_path / "c").verify()


# ----------------------------------------------------------------------------------------------------------
# prepare_text
# ----------------------------------------------------------------------------------------------------------
def _text_files(root: pathlib.Path, n: int = 8) -> list[str]:
    root.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"doc{i}.txt"
        path.write_text(f"Document {i} says: " + "naïve words " * (i + 1) + "\n")
        paths.append(str(path))
    return paths


def test_prepare_text_is_deterministic_and_fills_both_splits(tmp_path):
    files = _text_files(tmp_path / "in")
    first = prepare_text(files, domain="notes", tokenizer="byte", out=str(tmp_path / "a"), progress=False)
    prepare_text(files, domain="notes", tokenizer="byte", out=str(tmp_path / "b"), progress=False)
    assert _folder_bytes(tmp_path / "a") == _folder_bytes(tmp_path / "b")
    data = DomainData(tmp_path / "a")
    assert data.train.num_docs >= 1 and data.eval.num_docs >= 1
    assert data.train.num_docs + data.eval.num_docs == len(files)
    total_bytes = sum(pathlib.Path(f).stat().st_size for f in files)
    assert data.train.num_bytes + data.eval.num_bytes == total_bytes
    assert first["train"] == {"docs": data.train.num_docs, "tokens": data.train.num_tokens,
                              "bytes": data.train.num_bytes}
    # Each document is a whole input file followed by EOS, in the given order within its split.
    texts = [pathlib.Path(f).read_text() for f in files]
    assert sorted(_documents(data.train) + _documents(data.eval)) == sorted(texts)
    assert _documents(data.train) == [t for t in texts if t in _documents(data.train)]


def test_prepare_text_split_does_not_depend_on_the_process(tmp_path):
    # Python's hash() is salted per process: two interpreters with different seeds must agree.
    files = _text_files(tmp_path / "in", n=12)
    code = ("import sys; from clt.data.prepare import prepare_text; "
            "prepare_text(sys.argv[2:], domain='d', tokenizer='byte', out=sys.argv[1], eval_fraction=0.4, "
            "progress=False)")
    repo = pathlib.Path(__file__).resolve().parent.parent
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(repo)}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed), *files], env=env, check=True)
    assert _folder_bytes(tmp_path / "1") == _folder_bytes(tmp_path / "2")
    assert DomainData(tmp_path / "1").eval.num_docs > 1  # the draws decided, not only the forced document


def test_prepare_text_forces_one_document_into_each_split(tmp_path):
    files = _text_files(tmp_path / "in", n=3)
    summary = prepare_text(files, domain="d", tokenizer="byte", out=str(tmp_path / "out"), eval_fraction=0.0,
                           progress=False)
    assert (summary["train"]["docs"], summary["eval"]["docs"]) == (2, 1)
    with pytest.raises(PrepareError, match=r"has 1 document\(s\).*at least 2"):
        prepare_text(files[:1], domain="d", tokenizer="byte", out=str(tmp_path / "one"), progress=False)


def test_prepare_text_splits_paragraphs_at_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill first.\n\n  \nSecond.\n\nThird.\n")
    summary = prepare_text([str(path)], domain="d", tokenizer="byte", out=str(tmp_path / "out"),
                           split="paragraph", progress=False)
    assert summary["train"]["docs"] + summary["eval"]["docs"] == 3
    data = DomainData(tmp_path / "out")
    assert sorted(_documents(data.train) + _documents(data.eval)) == ["First paragraph,\nstill first.", "Second.",
                                                                      "Third."]
    assert data.train.num_bytes + data.eval.num_bytes == len("First paragraph,\nstill first.Second.Third.")


def test_prepare_text_input_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(PrepareError, match="no inputs: pass files"):
        prepare_text([], domain="d", tokenizer="byte", out=out, progress=False)
    with pytest.raises(PrepareError, match=r"missing.txt does not exist: check the path"):
        prepare_text([str(tmp_path / "missing.txt")], domain="d", tokenizer="byte", out=out, progress=False)
    files = _text_files(tmp_path / "in", n=2)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(PrepareError, match=r"empty.txt holds no text"):
        prepare_text(files + [str(empty)], domain="d", tokenizer="byte", out=out, progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(PrepareError, match=r"latin1.txt is not UTF-8 \(byte 0xe9 at offset 3\)"):
        prepare_text(files + [str(latin1)], domain="d", tokenizer="byte", out=out, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "in", "latin1.txt"]


class _SmallVocab(ByteTokenizer):
    """A byte tokenizer that wrongly claims a 100-id vocabulary: 'z' (122) overflows it."""

    name, vocab_size, eos_id = "small", 100, 99


def test_prepare_text_vocab_overflow_keeps_the_old_domain(tmp_path, monkeypatch):
    files = _text_files(tmp_path / "in", n=3)
    out = tmp_path / "out"
    prepare_text(files, domain="d", tokenizer="byte", out=str(out), progress=False)
    before = _folder_bytes(out)
    monkeypatch.setattr(prepare, "load_tokenizer", lambda spec: _SmallVocab())
    with pytest.raises(PrepareError, match=r"domain 'd': document 0 has token ids \[.*\] outside the vocabulary"):
        prepare_text(files, domain="d", tokenizer="small", out=str(out), progress=False)
    assert _folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


# ----------------------------------------------------------------------------------------------------------
# prepare_demo
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, prepare_demo(str(out), progress=False, max_bytes=200_000)


def _byte_frequencies(shard: Shard) -> np.ndarray:
    return np.bincount(shard.read_tokens(0, shard.num_tokens), minlength=shard.vocab_size) / shard.num_tokens


def _byte_share(shard: Shard, chars: str) -> float:
    return _byte_frequencies(shard)[[ord(c) for c in chars]].sum()


def _total_variation(a: Shard, b: Shard) -> float:
    return 0.5 * np.abs(_byte_frequencies(a) - _byte_frequencies(b)).sum()


def test_demo_domains_open_and_respect_the_cap(demo):
    out, summary = demo
    assert sorted(summary) == sorted(prepare.DEMO_DOMAINS)
    for name in prepare.DEMO_DOMAINS:
        data = DomainData(out / name)
        assert data.tokenizer == "byte"
        assert data.train.num_docs >= 1 and data.eval.num_docs >= 1
        assert 100_000 < data.train.num_bytes + data.eval.num_bytes <= 200_000
        assert data.train.num_sequences(256) > 0 and data.eval.num_sequences(256) > 0
        assert data.train.manifest()["sha256"] != data.eval.manifest()["sha256"]
        assert summary[name]["eval"]["tokens"] == data.eval.num_tokens


def test_demo_domains_are_different_distributions(demo):
    out, _ = demo
    prose, code, table = (DomainData(out / name) for name in ("prose", "code", "unicode"))
    # Code calls, indents and uses snake_case; the table is tab-separated; prose has neither.
    assert _byte_share(code.train, "()_") > 1.5 * _byte_share(prose.train, "()_")
    assert _byte_share(code.train, " ") > 1.3 * _byte_share(prose.train, " ")
    assert _byte_share(table.train, "\t") > 0.05 > _byte_share(prose.train, "\t") + _byte_share(code.train, "\t")
    # Domains differ more from each other than a domain's train split differs from its eval split.
    for a, b in [(prose, code), (prose, table), (code, table)]:
        within = max(_total_variation(a.train, a.eval), _total_variation(b.train, b.eval))
        assert _total_variation(a.train, b.train) > 1.5 * within, (a.path.name, b.path.name)


def test_demo_is_deterministic_and_silent(demo, tmp_path, capsys):
    out, _ = demo
    prepare_demo(str(tmp_path), progress=False, max_bytes=200_000)
    assert capsys.readouterr() == ("", "")
    for name in prepare.DEMO_DOMAINS:
        assert _folder_bytes(tmp_path / name) == _folder_bytes(out / name)
        assert DomainData(tmp_path / name).manifest_hash() == DomainData(out / name).manifest_hash()


# ----------------------------------------------------------------------------------------------------------
# Hugging Face model folders: the model's own tokenizer, its identity, and tokenizer files for an export.
# ----------------------------------------------------------------------------------------------------------
MIXED = "Plain ASCII, é, 中文, 🙂 and\nnew lines\r\n\ttabs."


def _model_folder(folder, *, adds_bos: bool, config: dict):
    """A model folder: a WordLevel tokenizer.json (with a BOS-prepending post-processor when `adds_bos`) and
    a config.json with the given special ids."""
    tokenizers = pytest.importorskip("tokenizers")
    folder.mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 3, "hello": 4, "world": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<|endoftext|>"])
    if adds_bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_folder_gives_bos_and_eos_from_its_config(tmp_path):
    llama = load_tokenizer(str(_model_folder(tmp_path / "llama", adds_bos=True,
                                             config=dict(bos_token_id=1, eos_token_id=[2, 3]))))
    assert (llama.name, llama.bos_id, llama.eos_id) == (str((tmp_path / "llama").resolve()), 1, 2)  # first EOS
    assert list(document_ids(llama, "hello world")) == [1, 4, 5, 2]
    # Qwen-like: the config names a BOS (the same id as EOS) that the tokenizer never adds: no BOS in the data
    qwen = load_tokenizer(str(_model_folder(tmp_path / "qwen", adds_bos=False,
                                            config=dict(bos_token_id=3, eos_token_id=3))))
    assert (qwen.bos_id, qwen.eos_id) == (None, 3)
    assert list(document_ids(qwen, "hello")) == [4, 3]
    # no ids in config.json: tokenizer_config.json's eos_token names it
    other = _model_folder(tmp_path / "other", adds_bos=False, config={})
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_tokenizer(str(other)).eos_id == 2


def test_the_fingerprint_follows_the_ids_and_is_recorded_in_the_shards(tmp_path):
    a = _model_folder(tmp_path / "a", adds_bos=True, config=dict(bos_token_id=1, eos_token_id=2))
    b = _model_folder(tmp_path / "b", adds_bos=True, config=dict(bos_token_id=1, eos_token_id=3))  # another EOS
    fa, fb = load_tokenizer(str(a)).fingerprint, load_tokenizer(str(b)).fingerprint
    assert fa != fb and len(fa) == 16 and load_tokenizer("byte").fingerprint == "byte"
    shutil.copytree(a, tmp_path / "a-copy")  # a copy elsewhere is the same tokenizer
    assert load_tokenizer(str(tmp_path / "a-copy")).fingerprint == fa
    files = _text_files(tmp_path / "in", n=2)
    prepare_text(files, domain="d", tokenizer=str(a), out=str(tmp_path / "out"), progress=False)
    assert DomainData(tmp_path / "out").tokenizer_fingerprint == fa
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index["tokenizer_sha256"] == fa
    del index["tokenizer_sha256"]  # a shard written before clt recorded fingerprints still loads
    (tmp_path / "out" / "train" / "index.json").write_text(json.dumps(index))
    (tmp_path / "out" / "eval" / "index.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "out" / "eval" / "index.json").read_text()).items()
         if k != "tokenizer_sha256"}))
    assert DomainData(tmp_path / "out").tokenizer_fingerprint is None


def test_byte_tokenizer_files_give_the_byte_ids_in_tokenizers_and_transformers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    assert write_hf_tokenizer("byte", tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    want = ByteTokenizer().encode(MIXED).tolist()
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(MIXED).ids == want
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(MIXED)["input_ids"] == want and hf.decode(want) == MIXED
    assert hf.eos_token_id == 256 and hf.decode([*want, 256], skip_special_tokens=True) == MIXED
    # and as a model folder's tokenizer, it is the byte tokenizer with the same ids (another fingerprint)
    folder = load_tokenizer(str(tmp_path))
    assert (folder.vocab_size, folder.eos_id, folder.bos_id) == (257, 256, None)
    assert folder.encode(MIXED).tolist() == want


def test_a_model_folders_tokenizer_files_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = _model_folder(tmp_path / "src", adds_bos=True, config=dict(bos_token_id=1, eos_token_id=2))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "out").mkdir()
    assert write_hf_tokenizer(str(src), tmp_path / "out") == ["tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = load_tokenizer(str(src))
    assert hf("hello world")["input_ids"] == [ours.bos_id, *ours.encode("hello world").tolist()]
