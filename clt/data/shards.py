"""Token shards: one split of one prepared domain, its writer and its reader, wherever it is stored.

A shard is a location of `store.py` (a local folder, gs:// or s3://) holding, in format 2,
  tokens/        zarr3 array: the flat token stream (uint16 when vocab_size <= 65536, else uint32); each
                 document is [BOS] + tokens + [EOS], so documents are separated by EOS;
  doc_offsets/   zarr3 int64 array: the start of each document in the stream, num_docs + 1 entries;
  doc_bytes/     zarr3 int64 array: the UTF-8 byte count of each document (bits per byte needs it);
  index.json     format, dtype, counts, vocabulary, tokenizer name and fingerprint, the sha256 of the stream.
index.json is written last (and removed first when a shard is rewritten in place), so a shard that has one is
complete. Format 1 (clt 0.1: tokens.bin, docs.npy, doc_bytes.npy, index.json in a local folder) stays
readable, memory-mapped. Sequences are not stored: sequence i of length L is tokens[i*L : i*L + L + 1]
(inputs and shifted targets), cut at load time, so one prepared domain serves any sequence length.
"""

from __future__ import annotations

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

from clt.data import store

FORMAT = 2
FORMATS = (1, 2)
INDEX = "index.json"
ARRAYS = ("tokens", "doc_offsets", "doc_bytes")
LEGACY_FILES = ("tokens.bin", "docs.npy", "doc_bytes.npy")
SHARD_FILES = ARRAYS + LEGACY_FILES + (INDEX,)  # what a local shard folder may hold (and be replaced)
_INDEX_KEYS = ("format", "dtype", "num_tokens", "num_docs", "num_bytes", "vocab_size", "eos_id", "bos_id",
               "tokenizer", "sha256")
_READ_BLOCK = 1 << 24


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


def swap_directory(staging: pathlib.Path, target: pathlib.Path) -> None:
    """Rename the finished folder `staging` to `target`, replacing it: the old one steps aside first (a folder
    cannot be renamed over a non-empty one) and comes back if the swap fails."""
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_replaceable(target: pathlib.Path, replaceable: Sequence[str]) -> None:
    """An existing `target` may be replaced only if every entry in it is named in `replaceable`: a mistyped
    output path must never wipe unrelated files."""
    if target.exists() and not target.is_dir():
        raise ShardError(f"refusing to replace {target}: it is a file, not a folder; choose another output path")
    if target.exists():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in replaceable)
        if foreign:
            raise ShardError(
                f"refusing to replace {target}: it holds {foreign[:5]} besides the expected {list(replaceable)}; "
                "choose a new or empty output folder")


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, *, replaceable: Sequence[str]) -> Iterator[pathlib.Path]:
    """Yield an empty folder next to `target` that replaces `target` when the block succeeds.

    On an exception the folder is deleted and `target` is untouched (see check_replaceable).
    """
    target = pathlib.Path(target)
    check_replaceable(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would outlive the rename, plain mkdir honours umask
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        swap_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def checked_document(i: int, ids: Any, num_bytes: Any, vocab_size: int, eos_id: int) -> np.ndarray:
    """Document i's ids as int64, or a ShardError saying what is wrong with them."""
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


class ShardWriter:
    """Appends documents to a new format-2 shard at `url`; `close()` writes index.json, which marks it complete.

    Documents arrive in blocks (a flat token array with per-document token and byte counts) so that copying a
    prepared part costs a few calls, not one per document; only the unwritten tail of each array is in memory.
    """

    def __init__(self, url: str | os.PathLike, *, vocab_size: int, eos_id: int, bos_id: int | None,
                 tokenizer_name: str, tokenizer_fingerprint: str | None = None):
        self.url = str(url)
        self.dtype = token_dtype(vocab_size)
        for label, special in (("eos_id", eos_id), ("bos_id", bos_id)):
            if special is not None and not 0 <= special < vocab_size:
                raise ShardError(f"{label} {special} is outside the vocabulary [0, {vocab_size})")
        self._meta = dict(vocab_size=int(vocab_size), eos_id=int(eos_id),
                          bos_id=None if bos_id is None else int(bos_id), tokenizer=tokenizer_name,
                          tokenizer_sha256=tokenizer_fingerprint)
        store.delete_keys(self.url, INDEX)  # a shard being rewritten must not look complete meanwhile
        self._tokens = store.Appender(store.join(self.url, "tokens"), self.dtype)
        self._offsets = store.Appender(store.join(self.url, "doc_offsets"), np.int64)
        self._bytes = store.Appender(store.join(self.url, "doc_bytes"), np.int64)
        self._offsets.append(np.zeros(1, np.int64))
        self._digest = hashlib.sha256()
        self.num_tokens = self.num_docs = self.num_bytes = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, doc_bytes: np.ndarray) -> None:
        """Append documents given as their concatenated ids and each one's token and UTF-8 byte count."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        doc_lengths = np.asarray(doc_lengths, np.int64)
        if int(doc_lengths.sum()) != tokens.size or len(doc_lengths) != len(doc_bytes):
            raise ShardError(f"{self.url}: {tokens.size} tokens do not add up to the document lengths given")
        self._tokens.append(tokens)
        self._digest.update(tokens.tobytes())
        self._offsets.append(self.num_tokens + np.cumsum(doc_lengths))
        self._bytes.append(np.asarray(doc_bytes, np.int64))
        self.num_tokens += tokens.size
        self.num_docs += len(doc_lengths)
        self.num_bytes += int(np.sum(doc_bytes))

    def add_documents(self, docs: Iterable[tuple[np.ndarray | list[int], int]], block: int = 4096) -> None:
        """Append (token ids ending with EOS, UTF-8 byte count) documents, each checked."""
        ids, lengths, sizes = [], [], []
        for i, (doc, num_bytes) in enumerate(docs, start=self.num_docs):
            arr = checked_document(i, doc, num_bytes, self._meta["vocab_size"], self._meta["eos_id"])
            ids.append(arr)
            lengths.append(arr.size)
            sizes.append(int(num_bytes))
            if len(ids) == block:
                self.add(np.concatenate(ids), np.array(lengths), np.array(sizes))
                ids, lengths, sizes = [], [], []
        if ids:
            self.add(np.concatenate(ids), np.array(lengths), np.array(sizes))

    def close(self) -> dict:
        """Finish the arrays, then write index.json; returns the index."""
        if not self.num_docs:
            raise ShardError(f"no documents to write to {self.url}: the input is empty; give at least one document")
        for appender in (self._tokens, self._offsets, self._bytes):
            appender.close()
        index = dict(format=FORMAT, dtype=self.dtype.name, num_tokens=self.num_tokens, num_docs=self.num_docs,
                     num_bytes=self.num_bytes, **self._meta, sha256=self._digest.hexdigest())
        store.write_json(self.url, INDEX, index)
        return index


def write_shard(out: str | os.PathLike, docs: Iterable[tuple[np.ndarray | list[int], int]], *,
                vocab_size: int, eos_id: int, bos_id: int | None, tokenizer_name: str,
                tokenizer_fingerprint: str | None = None) -> dict:
    """Stream (token ids ending with EOS, UTF-8 byte count) documents into a shard at `out`; return its index.

    A local shard is built next to `out` and renamed into place, so an error leaves an existing one as it was;
    on a bucket the old shard stops looking complete as soon as the rewrite starts.
    """
    meta = dict(vocab_size=vocab_size, eos_id=eos_id, bos_id=bos_id, tokenizer_name=tokenizer_name,
                tokenizer_fingerprint=tokenizer_fingerprint)
    if store.is_remote(out):
        writer = ShardWriter(out, **meta)
        writer.add_documents(docs)
        return writer.close()
    with staged_directory(out, replaceable=SHARD_FILES) as staging:
        writer = ShardWriter(staging, **meta)
        writer.add_documents(docs)
        return writer.close()


def _canonical_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _offsets(seq_len: int) -> np.ndarray:
    return np.arange(seq_len + 1)


class _Ready:
    """An already-computed read (format 1 reads memory-mapped files synchronously)."""

    def __init__(self, value: np.ndarray):
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


class Shard:
    """A prepared shard opened read-only; tokens are read on demand (memory-mapped or through tensorstore)."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        if not store.is_remote(self.url) and not pathlib.Path(self.url).is_dir():
            raise ShardError(f"no prepared shard at {self.url}: run `clt prepare` to create it")
        try:
            index = store.read_json(self.url, INDEX)
        except store.StoreError as e:
            raise ShardError(str(e)) from e
        if index is None and store.is_remote(self.url):
            try:
                store.list_keys(self.url)  # a missing or forbidden bucket reads as a missing key: say which
            except store.StoreError as e:
                raise ShardError(str(e)) from e
        if index is None:
            raise ShardError(f"no prepared shard at {self.url} (no {INDEX}): run `clt prepare` to create it "
                             "(an interrupted prepare leaves none)")
        missing = [k for k in _INDEX_KEYS if k not in index]
        if missing:
            raise ShardError(f"{store.join(self.url, INDEX)} lacks {missing}: re-run `clt prepare`")
        if index["format"] not in FORMATS:
            raise ShardError(f"{self.url} has shard format {index['format']}, this clt reads formats {FORMATS}: "
                             "re-run `clt prepare`")
        if index["dtype"] not in ("uint16", "uint32") or index["num_tokens"] < 1 or index["num_docs"] < 1:
            raise ShardError(f"{store.join(self.url, INDEX)} is inconsistent (dtype {index['dtype']!r}, "
                             f"{index['num_tokens']} tokens, {index['num_docs']} docs): re-run `clt prepare`")
        self._index = index
        self._dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self._doc_arrays: tuple[np.ndarray, np.ndarray] | None = None
        if index["format"] == 1:
            self._open_legacy()
        else:
            self._array = {name: store.open_array(store.join(self.url, name)) for name in ARRAYS}
            expected = {"tokens": self.num_tokens, "doc_offsets": self.num_docs + 1, "doc_bytes": self.num_docs}
            for name, n in expected.items():
                if self._array[name].shape != (n,) or self._array[name].dtype.numpy_dtype.kind not in "iu":
                    raise ShardError(f"{store.join(self.url, name)} has shape {self._array[name].shape}, the index "
                                     f"says ({n},): the shard is damaged; re-run `clt prepare`")

    def _open_legacy(self) -> None:
        path = pathlib.Path(self.url)
        absent = [name for name in LEGACY_FILES if not (path / name).is_file()]
        if absent:
            raise ShardError(f"shard {path} lacks {absent}: re-run `clt prepare`")
        size = (path / "tokens.bin").stat().st_size
        if size != self.num_tokens * self._dtype.itemsize:
            raise ShardError(f"{path / 'tokens.bin'} has {size} bytes, the index says "
                             f"{self.num_tokens} x {self._dtype.itemsize}: the shard is damaged; re-run `clt prepare`")
        # .view(np.ndarray): same mapping; indexing skips memmap's per-call wrapping
        self._stream = np.memmap(path / "tokens.bin", dtype=self._dtype, mode="r",
                                 shape=(self.num_tokens,)).view(np.ndarray)
        offsets = np.load(path / "docs.npy", mmap_mode="r")
        doc_bytes = np.load(path / "doc_bytes.npy", mmap_mode="r")
        if (offsets.shape != (self.num_docs + 1,) or offsets[-1] != self.num_tokens
                or doc_bytes.shape != (self.num_docs,)):
            raise ShardError(f"document index of {path} disagrees with index.json: re-run `clt prepare`")
        self._doc_arrays = (offsets, doc_bytes)

    format = property(lambda self: int(self._index["format"]), doc="1: memory-mapped files; 2: tensorstore arrays.")
    num_tokens = property(lambda self: int(self._index["num_tokens"]), doc="Tokens in the stream (EOS included).")
    num_docs = property(lambda self: int(self._index["num_docs"]), doc="Documents in the stream.")
    num_bytes = property(lambda self: int(self._index["num_bytes"]), doc="UTF-8 bytes of the documents' text.")
    vocab_size = property(lambda self: int(self._index["vocab_size"]), doc="The tokenizer's vocabulary size.")
    eos_id = property(lambda self: int(self._index["eos_id"]), doc="The id that ends every document.")
    bos_id = property(lambda self: self._index["bos_id"], doc="The id that starts documents, or None.")
    path = property(lambda self: self.url, doc="The shard's location (a folder or a bucket URL).")

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

    def _documents(self) -> tuple[np.ndarray, np.ndarray]:
        if self._doc_arrays is None:
            self._doc_arrays = tuple(self._array[n].read().result() for n in ARRAYS[1:])
        return self._doc_arrays

    doc_offsets = property(lambda self: self._documents()[0], doc="int64 start of each document, num_docs + 1.")
    doc_bytes = property(lambda self: self._documents()[1], doc="int64 UTF-8 byte count of each document.")

    def __reduce__(self):
        # Data-loader workers get the location and reopen it; pickling would copy mappings or handles.
        return Shard, (self.url,)

    def __repr__(self) -> str:
        return f"Shard({self.url!r}, {self.num_docs} docs, {self.num_tokens} tokens, {self.tokenizer})"

    def num_sequences(self, seq_len: int) -> int:
        """How many sequences of seq_len + 1 tokens (overlapping by one token) the stream holds."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        return (self.num_tokens - 1) // int(seq_len)

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] (a copy for format 2, a read-only view for format 1)."""
        if self.format == 1:
            return self._stream[start:stop]
        return self._array["tokens"][start:stop].read().result()

    def read_sequences(self, indices: np.ndarray | Sequence[int], seq_len: int) -> "_Ready | Any":
        """Start reading sequences `indices` (a 1-D array): `.result()` gives int32 [len(indices), seq_len + 1].

        Format 2 issues one batched, concurrent read for all rows, so a caller can start the reads of several
        shards before waiting for any.
        """
        # This runs for every batch: the checks are kept, but as cheap reductions (the loader's hot path).
        n = self.num_sequences(seq_len)
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":
            raise TypeError(f"sequence indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)]
            raise IndexError(f"sequence indices {bad[:8].tolist()} out of range [0, {n}) for seq_len {seq_len} "
                             f"in {self.url}")
        if self.format == 1 or not idx.size:
            stream = self._stream if self.format == 1 else np.zeros(0, self._dtype)
            return _Ready(stream[idx[:, None] * seq_len + _offsets(seq_len)].astype(np.int32))
        return _Int32(store.read_rows(self._array["tokens"], idx * seq_len, seq_len + 1))

    def sequences(self, indices: np.ndarray | Sequence[int], seq_len: int) -> np.ndarray:
        """Sequences `indices` as int32 [*indices.shape, seq_len + 1]: tokens[i*L : i*L + L + 1] for each i."""
        shape = np.shape(indices)
        return self.read_sequences(np.reshape(indices, -1), seq_len).result().reshape(*shape, seq_len + 1)

    def manifest(self) -> dict:
        """What identifies the contents without reading them: the token hash recorded at write time and the
        counts (format 1 also the file sizes, as clt 0.1 recorded them)."""
        if self.format == 1:
            return {"files": {name: (pathlib.Path(self.url) / name).stat().st_size
                              for name in LEGACY_FILES + (INDEX,)}, "sha256": self._index["sha256"]}
        return {k: self._index[k] for k in ("format", "num_tokens", "num_docs", "num_bytes", "sha256")}

    def manifest_hash(self) -> str:
        return _canonical_hash(self.manifest())

    def verify(self) -> None:
        """Re-hash the token stream against the index (slow: reads it all); a mismatch is a ShardError."""
        digest = hashlib.sha256()
        for start in range(0, self.num_tokens, _READ_BLOCK):
            digest.update(np.ascontiguousarray(self.read_tokens(start, min(start + _READ_BLOCK, self.num_tokens)),
                                               dtype=self._dtype).tobytes())
        if digest.hexdigest() != self._index["sha256"]:
            raise ShardError(f"the tokens of {self.url} do not match the sha256 in its index: they changed after "
                             "`clt prepare` wrote them; re-run `clt prepare`")


class _Int32:
    """A pending tensorstore read whose result is converted to int32 (the loader's dtype)."""

    def __init__(self, future: Any):
        self._future = future

    def result(self) -> np.ndarray:
        return self._future.result().astype(np.int32)


def domain_exists(url: str | os.PathLike) -> bool:
    """Whether a prepared domain (both splits complete) is at `url`: runs skip declared domains whose data is
    gone (only past phases used them)."""
    if not store.is_remote(url):
        return pathlib.Path(url).exists()
    return all(store.read_json(store.join(url, split), INDEX) is not None for split in ("train", "eval"))


class DomainData:
    """A prepared domain: `train` and `eval` shards of the same tokenizer, in a folder or under a bucket prefix."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url)
        if not store.is_remote(self.url) and not pathlib.Path(self.url).is_dir():
            raise ShardError(f"no prepared domain at {self.url}: run `clt prepare` to create it")
        self.train = Shard(store.join(self.url, "train"))
        self.eval = Shard(store.join(self.url, "eval"))
        for key in ("vocab_size", "eos_id", "bos_id", "tokenizer", "tokenizer_fingerprint"):
            if getattr(self.train, key) != getattr(self.eval, key):
                raise ShardError(f"{self.url}: train and eval disagree on {key} ({getattr(self.train, key)!r} vs "
                                 f"{getattr(self.eval, key)!r}): re-run `clt prepare` for the whole domain")

    path = property(lambda self: self.url, doc="The domain's location (a folder or a bucket URL).")

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
        return DomainData, (self.url,)

    def __repr__(self) -> str:
        return f"DomainData({self.url!r}, train={self.train.num_tokens}, eval={self.eval.num_tokens} tokens)"

    def manifest(self) -> dict:
        return {"train": self.train.manifest(), "eval": self.eval.manifest()}

    def manifest_hash(self) -> str:
        """One hash for both splits: recorded in plan.json so training on changed data is caught on resume."""
        return _canonical_hash(self.manifest())
