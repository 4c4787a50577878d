"""`clt prepare`: text files (or the built-in demo text) -> a prepared domain folder with train/ and eval/ shards.

A document's split is a pure function of the domain name and the document's text (a blake2b draw compared
with eval_fraction), so preparing the same inputs twice gives identical bytes, identical documents never
straddle the two splits, and adding a file does not reshuffle the others. Both splits are written into a
temporary folder next to the output and swapped in together, so a domain is never half old, half new.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import re
import sys
import sysconfig
import unicodedata
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from clt.data.shards import ShardError, staged_directory, write_shard
from clt.data.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, document_ids, load_tokenizer

SPLITS = ("train", "eval")
DEMO_DOMAINS = ("prose", "code", "unicode")
DEMO_EVAL_FRACTION = 0.05
_DOMAIN_FILES = ("train", "eval", "prepare.json")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Tests, IDLE, third-party packages and the Python 2 grammar tools are not the stdlib's own modern code.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"})


class PrepareError(ValueError):
    """Input that cannot be prepared; the one-line message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------
# The writer shared by user text and demo text.
# ----------------------------------------------------------------------------------------------------------
def _eval_draw(domain: str, text: str) -> float:
    """A stable draw in [0, 1) per document: Python's hash() is salted per process, blake2b is not."""
    digest = hashlib.blake2b(domain.encode() + b"\0" + text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _write_domain(documents: Callable[[], Iterable[str]], *, domain: str, tokenizer: Tokenizer,
                  out: str | os.PathLike, eval_fraction: float, progress: bool, sources: object) -> dict:
    """Write `out/{train,eval}` from `documents()` (called three times: one pass to split, one per shard)."""
    if not domain:
        raise PrepareError("the domain name is empty: give it a name such as 'prose'")
    if not 0.0 <= eval_fraction < 1.0:
        raise PrepareError(f"eval_fraction {eval_fraction} is outside [0, 1): use e.g. 0.05")
    draws = np.fromiter((_eval_draw(domain, text) for text in documents()), dtype=np.float64)
    if len(draws) < 2:
        raise PrepareError(f"domain {domain!r} has {len(draws)} document(s); a train and an eval split need at "
                           "least 2: add files or use split='paragraph'")
    is_eval = draws < eval_fraction
    # Each split gets at least one document, chosen by the same draws so the choice is just as stable.
    if not is_eval.any():
        is_eval[np.argmin(draws)] = True
    if is_eval.all():
        is_eval[np.argmax(draws)] = False

    summary: dict = {"domain": domain, "out": str(out), "tokenizer": tokenizer.name, "eval_fraction": eval_fraction,
                     "sources": sources}
    try:
        with tqdm.tqdm(total=len(draws), desc=f"prepare {domain}", unit="doc", disable=not progress) as bar, \
                staged_directory(out, replaceable=_DOMAIN_FILES) as staging:

            def split_documents(want_eval: bool) -> Iterator[tuple[np.ndarray, int]]:
                count = 0
                for count, text in enumerate(documents(), start=1):
                    if count > len(is_eval):
                        break
                    if is_eval[count - 1] == want_eval:
                        bar.update()
                        yield document_ids(tokenizer, text), len(text.encode("utf-8"))
                if count != len(is_eval):  # a file was edited between the passes: the splits would not line up
                    raise PrepareError(f"the inputs of domain {domain!r} changed while it was being prepared: "
                                       "run it again")

            for split in SPLITS:
                index = write_shard(staging / split, split_documents(split == "eval"), vocab_size=tokenizer.vocab_size,
                                    eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, tokenizer_name=tokenizer.name,
                                    tokenizer_fingerprint=tokenizer.fingerprint)
                summary[split] = {"docs": index["num_docs"], "tokens": index["num_tokens"],
                                  "bytes": index["num_bytes"]}
            # Without "out": the same inputs give byte-identical folders wherever they are written.
            record = {k: v for k, v in summary.items() if k != "out"}
            (staging / "prepare.json").write_text(json.dumps(record, indent=2) + "\n")
    except (ShardError, TokenizerError) as e:
        raise PrepareError(f"domain {domain!r}: {e}") from e
    return summary


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
# User text.
# ----------------------------------------------------------------------------------------------------------
def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not content
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}): convert it, "
                           f"e.g. iconv -t UTF-8 {path}") from e


def _file_documents(paths: Sequence[pathlib.Path], split: str) -> Iterator[str]:
    for path in paths:
        text = _read_text(path)
        docs = [text] if split == "file" else [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise PrepareError(f"{path} holds no text (empty or whitespace only): remove it from the inputs")
        yield from docs


def prepare_text(files: Sequence[str], *, domain: str, tokenizer: str, out: str, eval_fraction: float = 0.05,
                 split: str = "file", progress: bool = True) -> dict:
    """Tokenize UTF-8 text files into the domain folder `out` ({train,eval} shards); return counts per split.

    split="file": each file is one document; split="paragraph": documents are separated by blank lines.
    Documents keep the given order. Files are read again for each pass instead of being held in memory.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise PrepareError("no input files: pass at least two text files, or one with split='paragraph'")
    if split not in ("file", "paragraph"):
        raise PrepareError(f"split {split!r} is not one of 'file', 'paragraph'")
    paths = [pathlib.Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            problem = "is a folder: pass the files in it" if path.is_dir() else "does not exist: check the path"
            raise PrepareError(f"input {path} {problem}")
    try:
        tok = load_tokenizer(tokenizer)
    except TokenizerError as e:
        raise PrepareError(str(e)) from e
    return _write_domain(lambda: _file_documents(paths, split), domain=domain, tokenizer=tok, out=out,
                         eval_fraction=eval_fraction, progress=progress,
                         sources={"files": [str(p) for p in paths], "split": split})


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


def prepare_demo(out: str = "data/demo", progress: bool = True, max_bytes: int = 3_000_000,
                 tokenizer: str = "byte") -> dict:
    """Prepare the demo domains (prose, code, unicode) under `out/<domain>` (byte tokenizer by default; a
    model's own tokenizer makes them general text to replay while continuing that model).

    The text comes from this Python install (no download), so the output is identical on every run of the
    same install. Each domain holds at most max_bytes of text; returns prepare_text's summary per domain.
    """
    if max_bytes < 1:
        raise PrepareError(f"max_bytes must be positive, got {max_bytes}")
    try:
        tok = ByteTokenizer() if tokenizer == "byte" else load_tokenizer(tokenizer)
    except TokenizerError as e:
        raise PrepareError(str(e)) from e
    summaries = {}
    for domain, (source, description) in _DEMO_SOURCES.items():
        texts = _capped(source(), max_bytes)
        summaries[domain] = _write_domain(
            lambda texts=texts: iter(texts), domain=domain, tokenizer=tok, out=pathlib.Path(out) / domain,
            eval_fraction=DEMO_EVAL_FRACTION, progress=progress,
            sources={"demo": description, "python": sys.version.split()[0], "max_bytes": max_bytes})
    return summaries
