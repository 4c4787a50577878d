"""Token shards: the on-disk format of one split of one domain, its writer and its memory-mapped reader.

A shard folder holds
  tokens.bin     the flat little-endian token stream (uint16 when vocab_size <= 65536, else uint32); each
                 document is [BOS] + tokens + [EOS], so documents are separated by EOS;
  docs.npy       int64 start offset of each document in the stream, num_docs + 1 entries, the last num_tokens;
  doc_bytes.npy  int64 UTF-8 byte count of each document (bits per byte needs it);
  index.json     format, dtype, counts, vocabulary, tokenizer name and fingerprint, the sha256 of tokens.bin.
Sequences are not stored: sequence i of length L is tokens[i*L : i*L + L + 1] (inputs and shifted targets),
cut at load time, so one prepared domain serves any sequence length.

Writes are atomic: a shard is built in a temporary folder next to its target and renamed into place, so a
failed or interrupted write never leaves a partial shard and never damages the shard it would replace.
"""

from __future__ import annotations

import array
import contextlib
import functools
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

FORMAT = 1
SHARD_FILES = ("tokens.bin", "docs.npy", "doc_bytes.npy", "index.json")
_INDEX_KEYS = ("format", "dtype", "num_tokens", "num_docs", "num_bytes", "vocab_size", "eos_id", "bos_id",
               "tokenizer", "sha256")


class ShardError(ValueError):
    """A shard that cannot be written or read; the message names the path or values and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype holding every id of the vocabulary."""
    if vocab_size <= 0:
        raise ShardError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ShardError(f"vocab_size {vocab_size} does not fit uint32 token ids (at most {2**32})")


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, *, replaceable: Sequence[str]) -> Iterator[pathlib.Path]:
    """Yield an empty folder next to `target` that replaces `target` when the block succeeds.

    On an exception the folder is deleted and `target` is untouched. An existing `target` is replaced only if
    every entry in it is named in `replaceable`: a mistyped output path must never wipe unrelated files.
    """
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise ShardError(f"refusing to replace {target}: it is a file, not a folder; choose another output path")
    if target.exists():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in replaceable)
        if foreign:
            raise ShardError(
                f"refusing to replace {target}: it holds {foreign[:5]} besides the expected {list(replaceable)}; "
                "choose a new or empty output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would outlive the rename, plain mkdir honours umask
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # A directory cannot be renamed over a non-empty one, so the old one steps aside first and comes back
    # if the swap fails; the window without `target` is two renames long.
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old.exists():
            os.rename(old, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _checked_document(i: int, ids: Any, num_bytes: Any, vocab_size: int, eos_id: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ShardError(f"document {i} has shape {arr.shape}: a document is a non-empty 1-D list of token ids")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ShardError(f"document {i} has dtype {arr.dtype}: token ids must be integers")
    arr = arr.astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ShardError(
            f"document {i} has token ids {np.unique(bad)[:5].tolist()} outside the vocabulary [0, {vocab_size}): "
            "the tokenizer and vocab_size disagree; prepare with the tokenizer the ids came from")
    if arr[-1] != eos_id:
        raise ShardError(f"document {i} ends with {int(arr[-1])}, not EOS {eos_id}: build documents with "
                         "clt.data.tokenizer.document_ids")
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, (int, np.integer)) or num_bytes < 0:
        raise ShardError(f"document {i} has byte count {num_bytes!r}: it must be a non-negative int")
    return arr


def write_shard(out_dir: str | os.PathLike, docs: Iterable[tuple[np.ndarray | list[int], int]], *,
                vocab_size: int, eos_id: int, bos_id: int | None, tokenizer_name: str,
                tokenizer_fingerprint: str | None = None) -> dict:
    """Stream (token ids ending with EOS, UTF-8 byte count) documents into a shard at `out_dir`; return its index.

    Documents are written as they come (only per-document offsets stay in memory). An existing shard at
    `out_dir` is replaced atomically; any error leaves it as it was.
    """
    out_dir = pathlib.Path(out_dir)
    dtype = token_dtype(vocab_size)
    for label, special in (("eos_id", eos_id), ("bos_id", bos_id)):
        if special is not None and not 0 <= special < vocab_size:
            raise ShardError(f"{label} {special} is outside the vocabulary [0, {vocab_size})")
    with staged_directory(out_dir, replaceable=SHARD_FILES) as staging:
        offsets, doc_bytes = array.array("q", [0]), array.array("q")
        digest = hashlib.sha256()
        with open(staging / "tokens.bin", "wb") as f:
            for i, (ids, num_bytes) in enumerate(docs):
                data = _checked_document(i, ids, num_bytes, vocab_size, eos_id).astype(dtype).tobytes()
                f.write(data)
                digest.update(data)
                offsets.append(offsets[-1] + len(data) // dtype.itemsize)
                doc_bytes.append(int(num_bytes))
            f.flush()
            os.fsync(f.fileno())
        if not doc_bytes:
            raise ShardError(f"no documents to write to {out_dir}: the input is empty; give at least one document")
        np.save(staging / "docs.npy", np.frombuffer(offsets, dtype=np.int64))
        np.save(staging / "doc_bytes.npy", np.frombuffer(doc_bytes, dtype=np.int64))
        index = dict(format=FORMAT, dtype=dtype.name, num_tokens=offsets[-1], num_docs=len(doc_bytes),
                     num_bytes=int(sum(doc_bytes)), vocab_size=int(vocab_size), eos_id=int(eos_id),
                     bos_id=None if bos_id is None else int(bos_id), tokenizer=tokenizer_name,
                     tokenizer_sha256=tokenizer_fingerprint, sha256=digest.hexdigest())
        (staging / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _offsets(seq_len: int) -> np.ndarray:
    return np.arange(seq_len + 1)


class Shard:
    """A prepared shard opened read-only: the token stream is memory-mapped, never loaded whole."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise ShardError(f"no prepared shard at {self.path} (no index.json): run `clt prepare` to create it")
        try:
            index = json.loads(index_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{index_path} is not valid JSON ({e}): re-run `clt prepare`") from e
        missing = [k for k in _INDEX_KEYS if k not in index]
        if missing:
            raise ShardError(f"{index_path} lacks {missing}: re-run `clt prepare`")
        if index["format"] != FORMAT:
            raise ShardError(f"{self.path} has shard format {index['format']}, this clt reads format {FORMAT}: "
                             "re-run `clt prepare`")
        if index["dtype"] not in ("uint16", "uint32") or index["num_tokens"] < 1 or index["num_docs"] < 1:
            raise ShardError(f"{index_path} is inconsistent (dtype {index['dtype']!r}, {index['num_tokens']} tokens, "
                             f"{index['num_docs']} docs): re-run `clt prepare`")
        self._index = index
        dtype = np.dtype(index["dtype"]).newbyteorder("<")
        absent = [name for name in SHARD_FILES if not (self.path / name).is_file()]
        if absent:
            raise ShardError(f"shard {self.path} lacks {absent}: re-run `clt prepare`")
        size = (self.path / "tokens.bin").stat().st_size
        if size != index["num_tokens"] * dtype.itemsize:
            raise ShardError(f"{self.path / 'tokens.bin'} has {size} bytes, the index says "
                             f"{index['num_tokens']} x {dtype.itemsize}: the shard is damaged; re-run `clt prepare`")
        self.tokens: np.ndarray = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r",
                                            shape=(index["num_tokens"],))
        self._stream = self.tokens.view(np.ndarray)  # same mapping; indexing skips memmap's per-call wrapping
        self.doc_offsets: np.ndarray = np.load(self.path / "docs.npy", mmap_mode="r")
        self.doc_bytes: np.ndarray = np.load(self.path / "doc_bytes.npy", mmap_mode="r")
        if (self.doc_offsets.shape != (self.num_docs + 1,) or self.doc_offsets[-1] != self.num_tokens
                or self.doc_bytes.shape != (self.num_docs,)):
            raise ShardError(f"document index of {self.path} disagrees with index.json: re-run `clt prepare`")

    num_tokens = property(lambda self: int(self._index["num_tokens"]), doc="Tokens in the stream (EOS included).")
    num_docs = property(lambda self: int(self._index["num_docs"]), doc="Documents in the stream.")
    num_bytes = property(lambda self: int(self._index["num_bytes"]), doc="UTF-8 bytes of the documents' text.")
    vocab_size = property(lambda self: int(self._index["vocab_size"]), doc="The tokenizer's vocabulary size.")
    eos_id = property(lambda self: int(self._index["eos_id"]), doc="The id that ends every document.")
    bos_id = property(lambda self: self._index["bos_id"], doc="The id that starts documents, or None.")

    @property
    def tokenizer(self) -> str:
        """The tokenizer's name: "byte" or the tokenizer.json path it was prepared with."""
        return str(self._index["tokenizer"])

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """The tokenizer's identity (`Tokenizer.fingerprint`); None for shards written before clt recorded it."""
        return self._index.get("tokenizer_sha256")

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token, EOS/BOS included in the tokens: converts nats per token to bits per byte."""
        return self.num_bytes / self.num_tokens

    def __reduce__(self):
        # Data-loader workers get the path and re-map the file; pickling the memmap would copy every token.
        return Shard, (str(self.path),)

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, {self.num_docs} docs, {self.num_tokens} tokens, {self.tokenizer})"

    def num_sequences(self, seq_len: int) -> int:
        """How many sequences of seq_len + 1 tokens (overlapping by one token) the stream holds."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        return (self.num_tokens - 1) // int(seq_len)

    def sequence(self, i: int, seq_len: int) -> np.ndarray:
        """Sequence i as a read-only view of seq_len + 1 tokens: the loader's per-row path (one slice, no
        fancy indexing), so a batch's cost does not depend on how many domains its rows come from."""
        start = i * seq_len
        if i < 0 or start + seq_len + 1 > self.num_tokens:
            raise IndexError(f"sequence index {i} out of range [0, {self.num_sequences(seq_len)}) for seq_len "
                             f"{seq_len} in {self.path}")
        return self._stream[start:start + seq_len + 1]

    def sequences(self, indices: np.ndarray | Sequence[int], seq_len: int) -> np.ndarray:
        """Sequences `indices` as int32 [*indices.shape, seq_len + 1]: tokens[i*L : i*L + L + 1] for each i."""
        # This runs for every batch: the checks are kept, but as cheap reductions (the loader's hot path).
        n = self.num_sequences(seq_len)
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise TypeError(f"sequence indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)]
            raise IndexError(f"sequence indices {bad[:8].tolist()} out of range [0, {n}) for seq_len {seq_len} "
                             f"in {self.path}")
        positions = idx[..., None] * seq_len + _offsets(seq_len)
        return self._stream[positions].astype(np.int32)

    def manifest(self) -> dict:
        """File sizes and the token hash recorded at write time: identifies the contents without reading them."""
        return {"files": {name: (self.path / name).stat().st_size for name in SHARD_FILES},
                "sha256": self._index["sha256"]}

    def manifest_hash(self) -> str:
        return _canonical_hash(self.manifest())

    def verify(self) -> None:
        """Re-hash tokens.bin against the index (slow: reads the whole stream); a mismatch is a ShardError."""
        digest = hashlib.sha256()
        with open(self.path / "tokens.bin", "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != self._index["sha256"]:
            raise ShardError(f"{self.path / 'tokens.bin'} does not match the sha256 in its index: it changed after "
                             "`clt prepare` wrote it; re-run `clt prepare`")


class DomainData:
    """A prepared domain: a folder with `train/` and `eval/` shards of the same tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise ShardError(f"no prepared domain at {self.path}: run `clt prepare` to create it")
        self.train = Shard(self.path / "train")
        self.eval = Shard(self.path / "eval")
        for key in ("vocab_size", "eos_id", "bos_id", "tokenizer", "tokenizer_fingerprint"):
            if getattr(self.train, key) != getattr(self.eval, key):
                raise ShardError(f"{self.path}: train and eval disagree on {key} ({getattr(self.train, key)!r} vs "
                                 f"{getattr(self.eval, key)!r}): re-run `clt prepare` for the whole domain")

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    @property
    def tokenizer(self) -> str:
        return self.train.tokenizer

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.train.tokenizer_fingerprint

    def __reduce__(self):
        return DomainData, (str(self.path),)

    def __repr__(self) -> str:
        return f"DomainData({str(self.path)!r}, train={self.train.num_tokens}, eval={self.eval.num_tokens} tokens)"

    def manifest(self) -> dict:
        return {"train": self.train.manifest(), "eval": self.eval.manifest()}

    def manifest_hash(self) -> str:
        """One hash for both splits: recorded in plan.json so training on changed data is caught on resume."""
        return _canonical_hash(self.manifest())
