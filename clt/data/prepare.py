"""`clt prepare`: a corpus (text, JSONL, Parquet, or the built-in demo text) -> a prepared domain.

The inputs are cut into parts (contiguous document ranges, `inputs.py`) that depend only on the inputs, never
on the number of workers. Each part is tokenized on its own (in this process, in N processes, or on a Ray
cluster) into a small train and eval shard of its own, then the parts are copied in order into the domain's
two shards. So the output is identical, byte for byte, whatever the workers, and an interrupted prepare
resumes: finished parts are kept (in `.NAME.partial/` next to a local output, `PREFIX/.partial/` on a
bucket) and reused when the same command runs again on the same inputs.

A document's split is a pure function of the domain name and the document's text (a blake2b draw compared
with eval_fraction): preparing the same inputs twice gives identical bytes, identical documents never
straddle the two splits, and adding a file does not reshuffle the others. A local domain is assembled in a
temporary folder and renamed into place; on a bucket the old domain stops looking complete (its index files
go) before the new one is written, and `prepare.json` is written last.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import sysconfig
import time
import unicodedata
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from clt.data import inputs, store
from clt.data.shards import INDEX, ShardError, ShardWriter, Shard, check_replaceable, checked_document, swap_directory
from clt.data.tokenizer import Tokenizer, TokenizerError, document_ids, load_tokenizer

SPLITS = ("train", "eval")
DEMO_DOMAINS = ("prose", "code", "unicode")
DEMO_EVAL_FRACTION = 0.05
PART_BYTES = 16 << 20  # input bytes per part: small enough for a responsive progress bar, large enough to amortise
_DOMAIN_FILES = ("train", "eval", "prepare.json")
_PARTIAL = ".partial"
_FLUSH_DOCS = 4096
# Tests, IDLE, third-party packages and the Python 2 grammar tools are not the stdlib's own modern code.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"})


class PrepareError(ValueError):
    """Input that cannot be prepared; the one-line message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------
# One part: documents -> a small train shard and a small eval shard (what each worker runs).
# ----------------------------------------------------------------------------------------------------------
def _eval_draw(domain: str, text: str) -> float:
    """A stable draw in [0, 1) per document: Python's hash() is salted per process, blake2b is not."""
    digest = hashlib.blake2b(domain.encode() + b"\0" + text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _tokenizer(spec: str) -> Tokenizer:
    """Loaded once per process (workers tokenize many parts), again if the files changed in between."""
    path = pathlib.Path(spec)
    files = sorted(path.glob("*")) if path.is_dir() else [path] if path.is_file() else []
    stamp = [(p.name, p.stat().st_mtime_ns) for p in files]
    return _cached_tokenizer(spec, repr(stamp))


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(spec: str, stamp: str) -> Tokenizer:
    return load_tokenizer(spec)


@dataclasses.dataclass(frozen=True)
class PartJob:
    """Everything a worker needs for one part; small and picklable (it travels to processes and Ray)."""

    number: int
    label: str  # where the part lies in the inputs (part of the job's identity when resuming)
    documents: Callable[..., Iterable[str]]  # documents(on_bad=callback or None) -> the part's texts
    domain: str
    tokenizer: str
    eval_fraction: float
    skip_bad: bool
    out: str  # the part's location: staging/parts/NNNNNN


class _SplitStream:
    """One split of one part, written through a ShardWriter created on its first document."""

    def __init__(self, url: str, tok: Tokenizer):
        self.url, self.tok = url, tok
        self.writer: ShardWriter | None = None
        self.ids: list[np.ndarray] = []
        self.sizes: list[int] = []

    def add(self, ids: np.ndarray, num_bytes: int) -> None:
        self.ids.append(ids)
        self.sizes.append(num_bytes)
        if len(self.ids) >= _FLUSH_DOCS:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        if self.writer is None:
            self.writer = ShardWriter(self.url, vocab_size=self.tok.vocab_size, eos_id=self.tok.eos_id,
                                      bos_id=self.tok.bos_id, tokenizer_name=self.tok.name,
                                      tokenizer_fingerprint=self.tok.fingerprint)
        self.writer.add(np.concatenate(self.ids), np.array([len(a) for a in self.ids]), np.array(self.sizes))
        self.ids, self.sizes = [], []

    def close(self) -> dict:
        self.flush()
        if self.writer is None:
            return {"docs": 0, "tokens": 0, "bytes": 0}
        index = self.writer.close()
        return {"docs": index["num_docs"], "tokens": index["num_tokens"], "bytes": index["num_bytes"]}


def tokenize_part(job: PartJob, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize one part into `job.out/{train,eval}` and write `job.out/part.json` (last: it marks the part
    done); returns that record. `progress(docs, tokens)` is called now and then with increments."""
    tok = _tokenizer(job.tokenizer)
    streams = {split: _SplitStream(store.join(job.out, split), tok) for split in SPLITS}
    bad: list[str] = []
    lowest: list = [2.0, "", -1]  # (draw, split, position in split) of the extreme documents:
    highest: list = [-1.0, "", -1]  # the driver moves one if a whole split ends up empty
    docs = tokens = reported_docs = reported_tokens = 0
    for text in job.documents(on_bad=bad.append if job.skip_bad else None):
        draw = _eval_draw(job.domain, text)
        split = "eval" if draw < job.eval_fraction else "train"
        stream = streams[split]
        position = stream.writer.num_docs if stream.writer else 0
        position += len(stream.ids)
        ids = checked_document(docs, document_ids(tok, text), 0, tok.vocab_size, tok.eos_id)
        stream.add(ids, len(text.encode("utf-8")))
        if draw < lowest[0]:
            lowest = [draw, split, position]
        if draw > highest[0]:
            highest = [draw, split, position]
        docs, tokens = docs + 1, tokens + len(ids)
        if progress is not None and docs - reported_docs >= 256:
            progress(docs - reported_docs, tokens - reported_tokens)
            reported_docs, reported_tokens = docs, tokens
    counts = {split: streams[split].close() for split in SPLITS}
    record = {"number": job.number, "docs": docs, **counts, "lowest": lowest, "highest": highest,
              "skipped": len(bad), "skipped_examples": bad[:5]}
    store.write_json(job.out, "part.json", record)
    if progress is not None:
        progress(docs - reported_docs, tokens - reported_tokens)
    return record


# ----------------------------------------------------------------------------------------------------------
# Running the parts: here, in N processes, or on a Ray cluster.
# ----------------------------------------------------------------------------------------------------------
class _Progress:
    """Documents and tokens per second over all parts (per document here, per finished part elsewhere)."""

    def __init__(self, domain: str, parts: int, done: int, enabled: bool):
        self.bar = tqdm.tqdm(desc=f"prepare {domain}", unit=" doc", disable=not enabled, smoothing=0.1)
        self.parts, self.done, self.tokens, self.start = parts, done, 0, time.perf_counter()
        self._postfix()

    def _postfix(self) -> None:
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, part {self.done}/{self.parts}", refresh=False)

    def add(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self._postfix()
        self.bar.update(docs)

    def part_done(self, record: dict, counted: bool) -> None:
        self.done += 1
        if not counted:
            self.add(record["docs"], record["train"]["tokens"] + record["eval"]["tokens"])
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_here(jobs: Sequence[PartJob], done: Callable[[dict], None], progress: _Progress) -> None:
    for job in jobs:
        done(tokenize_part(job, progress=progress.add))


def _run_processes(jobs: Sequence[PartJob], workers: int, done: Callable[[dict], None]) -> None:
    # spawn, not fork: the parent may hold JAX or tensorstore threads that a forked child would inherit broken.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [pool.submit(tokenize_part, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                done(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_ray(jobs: Sequence[PartJob], address: str, done: Callable[[dict], None]) -> None:
    try:
        import ray
    except ImportError as e:
        raise PrepareError("--ray needs Ray: pip install 'clt[ray]'") from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 logging_level="ERROR", include_dashboard=False)
    remote = ray.remote(tokenize_part)
    pending = [remote.remote(job) for job in jobs]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------------------
# The driver: plan the parts, run those not done yet, assemble the domain.
# ----------------------------------------------------------------------------------------------------------
def _staging(out: str) -> str:
    """Where the parts (and, locally, the assembled domain) wait: next to a local output, inside a bucket one."""
    if store.is_remote(out):
        return store.join(out, _PARTIAL)
    target = pathlib.Path(out).absolute()
    return str(target.parent / f".{target.name}{_PARTIAL}")


def _check_output(out: str) -> None:
    """Refuse an output that holds anything but a prepared domain (and our own leftovers)."""
    try:
        if not store.is_remote(out):
            check_replaceable(pathlib.Path(out), _DOMAIN_FILES)
            return
        foreign = sorted({k.split("/")[0] for k in store.list_keys(out)} - set(_DOMAIN_FILES) - {_PARTIAL})
    except (ShardError, store.StoreError) as e:
        raise PrepareError(str(e)) from e
    if foreign:
        raise PrepareError(f"refusing to write {out}: it holds {foreign[:5]} besides a prepared domain's "
                           f"{list(_DOMAIN_FILES)}; choose a new or empty prefix")


def _start_or_resume(staging: str, job_key: dict) -> set[int]:
    """Reuse the finished parts of an interrupted run of the same job; anything else in staging is wiped."""
    if store.read_json(staging, "job.json") == job_key:
        return {int(k.split("/")[0]) for k in store.list_keys(store.join(staging, "parts"))
                if k.endswith("/part.json") and k.count("/") == 1}
    if store.is_remote(staging):
        store.delete_keys(staging)
    else:
        shutil.rmtree(staging, ignore_errors=True)
    store.write_json(staging, "job.json", job_key)
    return set()


def _moved_document(records: list[dict]) -> tuple[str, int, int] | None:
    """(from split, part, position) of the document that moves so that neither split is empty: the lowest draw
    goes to eval when no document drew eval, the highest to train when all did (as stable as the draws)."""
    total = {split: sum(r[split]["docs"] for r in records) for split in SPLITS}
    if total["eval"] == 0:
        r = min(records, key=lambda r: r["lowest"][0] if r["docs"] else 2.0)
        return "train", r["number"], r["lowest"][2]
    if total["train"] == 0:
        r = max(records, key=lambda r: r["highest"][0] if r["docs"] else -1.0)
        return "eval", r["number"], r["highest"][2]
    return None


def _copy_part(writer: ShardWriter, url: str, keep: slice | None = None, drop: int | None = None) -> None:
    """Append a part's split (or only its documents `keep`, or all but document `drop`) to the domain's shard."""
    shard = Shard(url)
    offsets, sizes = np.asarray(shard.doc_offsets), np.asarray(shard.doc_bytes)
    ranges = [keep] if keep is not None else [slice(0, shard.num_docs)]
    if drop is not None:
        ranges = [slice(0, drop), slice(drop + 1, shard.num_docs)]
    for r in ranges:
        lo, hi = r.start, r.stop
        if hi > lo:
            tokens = shard.read_tokens(int(offsets[lo]), int(offsets[hi]))
            writer.add(tokens, np.diff(offsets[lo:hi + 1]), sizes[lo:hi])


def _assemble(final: str, staging: str, records: list[dict], tok: Tokenizer) -> dict:
    """Copy the parts, in order, into `final/{train,eval}`; returns the counts per split."""
    moved = _moved_document(records)
    counts = {}
    for split in SPLITS:
        writer = ShardWriter(store.join(final, split), vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                             bos_id=tok.bos_id, tokenizer_name=tok.name, tokenizer_fingerprint=tok.fingerprint)
        for r in records:
            part = store.join(staging, "parts", f"{r['number']:06d}")
            if r[split]["docs"]:
                drop = moved[2] if moved and moved[:2] == (split, r["number"]) else None
                _copy_part(writer, store.join(part, split), drop=drop)
            if moved and moved[0] != split and moved[1] == r["number"]:
                _copy_part(writer, store.join(part, moved[0]), keep=slice(moved[2], moved[2] + 1))
        index = writer.close()
        counts[split] = {"docs": index["num_docs"], "tokens": index["num_tokens"], "bytes": index["num_bytes"]}
    return counts


def _job_key(jobs: Sequence[PartJob], tok: Tokenizer, sources: dict, files: Sequence[str]) -> dict:
    """What must match for an interrupted prepare's parts to be reused: inputs (with sizes and times), parts,
    tokenizer and split rule."""
    stats = {}
    for f in files:
        st = os.stat(f)
        stats[str(f)] = [st.st_size, st.st_mtime_ns]
    first = jobs[0]
    return {"format": 2, "domain": first.domain, "tokenizer": tok.fingerprint, "eval_fraction": first.eval_fraction,
            "skip_bad": first.skip_bad, "parts": [j.label for j in jobs], "files": stats,
            "sources": json.loads(json.dumps(sources, default=str))}


def _write_domain(parts: Sequence[tuple[str, Callable[..., Iterable[str]]]], *, domain: str, tokenizer: str,
                  out: str | os.PathLike, eval_fraction: float, progress: bool, sources: dict,
                  files: Sequence[str] = (), workers: int = 1, ray: str | None = None,
                  skip_bad: bool = False) -> dict:
    """Tokenize `parts` ((label, documents) pairs: `documents(on_bad=)` gives one part's texts) and write the
    domain at `out`."""
    out = str(out)
    if not domain:
        raise PrepareError("the domain name is empty: give it a name such as 'prose'")
    if not 0.0 <= eval_fraction < 1.0:
        raise PrepareError(f"eval_fraction {eval_fraction} is outside [0, 1): use e.g. 0.05")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PrepareError(f"--workers {workers!r}: give a positive number of processes")
    try:
        tok = _tokenizer(tokenizer)
    except TokenizerError as e:
        raise PrepareError(str(e)) from e
    _check_output(out)
    staging = _staging(out)
    jobs = [PartJob(n, label, docs, domain, tokenizer, eval_fraction, skip_bad,
                    store.join(staging, "parts", f"{n:06d}")) for n, (label, docs) in enumerate(parts)]
    if not jobs:
        raise PrepareError(f"domain {domain!r} has no documents (the inputs hold no records): check the inputs")
    assembling = False
    try:
        finished = _start_or_resume(staging, _job_key(jobs, tok, sources, files))
        records = {n: store.read_json(jobs[n].out, "part.json") for n in finished}
        todo = [j for j in jobs if j.number not in finished]
        bar = _Progress(domain, len(jobs), len(finished), progress)
        here = not ray and (workers == 1 or len(todo) < 2)
        try:
            def done(record: dict) -> None:
                records[record["number"]] = record
                bar.part_done(record, counted=here)

            if here:
                _run_here(todo, done, bar)
            elif ray:
                _run_ray(todo, ray, done)
            else:
                _run_processes(todo, workers, done)
        finally:
            bar.close()
        ordered = [records[n] for n in range(len(jobs))]
        total_docs = sum(r["docs"] for r in ordered)
        if total_docs < 2:
            raise PrepareError(f"domain {domain!r} has {total_docs} document(s); a train and an eval split need at "
                               "least 2: add inputs (or use --split paragraph)")
        final = out if store.is_remote(out) else store.join(staging, "domain")
        if store.is_remote(out):  # from here on the old domain must not look complete
            assembling = True
            for key in ("prepare.json", f"train/{INDEX}", f"eval/{INDEX}"):
                store.delete_keys(out, key)
        counts = _assemble(final, staging, ordered, tok)
        skipped = sum(r["skipped"] for r in ordered)
        summary = {"domain": domain, "tokenizer": tok.name, "eval_fraction": eval_fraction, "sources": sources,
                   **counts, "skipped": skipped,
                   "skipped_examples": [e for r in ordered for e in r["skipped_examples"]][:5]}
        store.write_json(final, "prepare.json", summary)  # last: it says the domain is complete
        if store.is_remote(out):
            store.delete_keys(out, _PARTIAL + "/")
        else:
            _check_output(out)
            swap_directory(pathlib.Path(final), pathlib.Path(out))
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as e:  # bad input or storage: nothing partial stays (an interrupt keeps parts to resume)
        _discard(staging, *([store.join(out, split) for split in SPLITS] if assembling else []))
        if isinstance(e, (ShardError, TokenizerError, store.StoreError, inputs.InputError)):
            raise PrepareError(f"domain {domain!r}: {e}") from e
        raise
    return dict(summary, out=out)


def _discard(*locations: str) -> None:
    """Delete what a failed prepare wrote (its staging, and a bucket domain's half-assembled splits)."""
    for url in locations:
        try:
            if store.is_remote(url):
                store.delete_keys(url)
            else:
                shutil.rmtree(url, ignore_errors=True)
        except store.StoreError:
            pass  # the original error says more than a failed cleanup of an unreachable bucket


def summary_rows(summaries: Iterable[dict]) -> list[dict]:
    """One table row per prepared domain (what `clt prepare` prints; prepare.json keeps the full summary)."""
    rows = []
    for sm in summaries:
        train, ev = sm["train"], sm["eval"]
        tokens = train["tokens"] + ev["tokens"]
        rows.append({"domain": sm["domain"], "train docs": f"{train['docs']:,}", "train tokens": f"{train['tokens']:,}",
                     "eval docs": f"{ev['docs']:,}", "eval tokens": f"{ev['tokens']:,}",
                     "bytes/token": f"{(train['bytes'] + ev['bytes']) / max(tokens, 1):.2f}"})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Corpora: text files, JSONL, Parquet and `datasets` folders (read by inputs.py).
# ----------------------------------------------------------------------------------------------------------
def prepare(kind: str, files: Sequence[str], *, domain: str, tokenizer: str = "byte", out: str,
            eval_fraction: float = 0.05, field: str = "text", split: str = "file", workers: int = 1,
            ray: str | None = None, skip_bad: bool = False, progress: bool = True,
            part_bytes: int = PART_BYTES) -> dict:
    """Tokenize a corpus (`kind` text|jsonl|parquet; files or globs) into the domain `out` ({train,eval} shards,
    a local folder or a gs:// / s3:// prefix); return the domain's summary (counts per split, skipped records).

    field: the JSONL key or Parquet column holding the text. split (text only): "file" makes each file one
    document, "paragraph" splits documents at blank lines. skip_bad: count and skip bad records instead of
    stopping at the first. workers / ray: tokenize parts in N processes or on a Ray cluster (same output).
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if kind not in inputs.FORMATS:
        raise PrepareError(f"input kind {kind!r} is not one of {', '.join(inputs.FORMATS)}")
    if split not in ("file", "paragraph"):
        raise PrepareError(f"split {split!r} is not one of 'file', 'paragraph'")
    try:
        parts = inputs.plan_parts(kind, [str(f) for f in files], part_bytes=part_bytes)
    except inputs.InputError as e:
        raise PrepareError(str(e)) from e
    readers = [(part.describe(), functools.partial(inputs.iter_documents, part, field=field, split=split))
               for part in parts]
    used = sorted({f for part in parts for f in part.files})
    sources = {"kind": kind, "inputs": [str(f) for f in files], "field": field, "split": split}
    return _write_domain(readers, domain=domain, tokenizer=tokenizer, out=out, eval_fraction=eval_fraction,
                         progress=progress, sources=sources, files=used, workers=workers, ray=ray,
                         skip_bad=skip_bad)


def prepare_text(files: Sequence[str], *, domain: str, tokenizer: str, out: str, eval_fraction: float = 0.05,
                 split: str = "file", progress: bool = True, workers: int = 1) -> dict:
    """Tokenize UTF-8 text files into the domain `out` (see `prepare`)."""
    return prepare("text", files, domain=domain, tokenizer=tokenizer, out=out, eval_fraction=eval_fraction,
                   split=split, progress=progress, workers=workers)


# ----------------------------------------------------------------------------------------------------------
# Demo text: real text that every CPython install carries.
# ----------------------------------------------------------------------------------------------------------
def _stdlib_python_files() -> list[pathlib.Path]:
    """The standard library's own .py files in sorted relative-path order (tests, IDLE, packages pruned)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        found += [pathlib.Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _source(path: pathlib.Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # unreadable files are skipped the same way on every run


def _code_documents() -> Iterator[str]:
    for path in _stdlib_python_files():
        text = _source(path)
        if text and text.strip():
            yield text


def _prose_documents() -> Iterator[str]:
    """The pydoc help topics, then each stdlib module's docstrings (parsed with ast, never imported)."""
    from pydoc_data.topics import topics  # a plain dict of help texts, shipped with CPython

    for key in sorted(topics):
        yield topics[key].strip()
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in _stdlib_python_files():
        text = _source(path)
        if not text:
            continue
        try:
            with warnings.catch_warnings():  # old escape sequences in a few modules warn while parsing
                warnings.simplefilter("ignore")
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + sorted((n for n in ast.walk(tree) if isinstance(n, definitions)), key=lambda n: n.lineno)
        docstrings = [d for d in (ast.get_docstring(n) for n in nodes) if d]
        if docstrings:
            yield "\n\n".join(docstrings)


def _unicode_documents() -> Iterator[str]:
    """The Unicode character database as a table, one document per 128 code points: text unlike prose or code."""
    lines: list[str] = []
    for cp in range(sys.maxunicode + 1):
        char = chr(cp)
        name = unicodedata.name(char, "")
        # Algorithmic names (CJK UNIFIED IDEOGRAPH-4E00, HANGUL SYLLABLE GA, ...) would drown the table.
        if name and not name.endswith(f"{cp:X}") and not name.startswith("HANGUL SYLLABLE "):
            category = unicodedata.category(char)
            glyph = char if category[0] not in "CZ" else ""  # no raw controls or line separators in the text
            lines.append(f"U+{cp:04X}\t{glyph}\t{name}\t{category}")
        if cp % 128 == 127 and lines:
            yield "\n".join(lines) + "\n"
            lines = []


def _capped(documents: Iterable[str], max_bytes: int) -> list[str]:
    """Documents in order while they fit in max_bytes of UTF-8; one too large is skipped, not cut."""
    kept, left = [], max_bytes
    for text in documents:
        size = len(text.encode("utf-8"))
        if size <= left:
            kept.append(text)
            left -= size
        if left < max_bytes // 100:  # close enough to full: stop before reading the rest of the source
            break
    return kept


_DEMO_SOURCES: dict[str, tuple[Callable[[], Iterator[str]], str]] = {
    "prose": (_prose_documents, "pydoc help topics and standard-library docstrings"),
    "code": (_code_documents, "standard-library Python sources"),
    "unicode": (_unicode_documents, f"Unicode {unicodedata.unidata_version} character names"),
}


def _demo_texts(domain: str, max_bytes: int, on_bad: Callable[[str], None] | None = None) -> Iterator[str]:
    """The demo domain's documents (one part; demo text has no bad records, so on_bad is unused)."""
    return iter(_capped(_DEMO_SOURCES[domain][0](), max_bytes))


def prepare_demo(out: str = "data/demo", progress: bool = True, max_bytes: int = 3_000_000,
                 tokenizer: str = "byte") -> dict:
    """Prepare the demo domains (prose, code, unicode) under `out/<domain>` (byte tokenizer by default; a
    model's own tokenizer makes them general text to replay while continuing that model).

    The text comes from this Python install (no download), so the output is identical on every run of the
    same install. Each domain holds at most max_bytes of text; returns the summary per domain.
    """
    if max_bytes < 1:
        raise PrepareError(f"max_bytes must be positive, got {max_bytes}")
    summaries = {}
    for domain, (_, description) in _DEMO_SOURCES.items():
        summaries[domain] = _write_domain(
            [(f"demo {domain}", functools.partial(_demo_texts, domain, max_bytes))], domain=domain, tokenizer=tokenizer,
            out=store.join(out, domain), eval_fraction=DEMO_EVAL_FRACTION, progress=progress,
            sources={"demo": description, "python": sys.version.split()[0], "max_bytes": max_bytes})
    return summaries
