"""The corpora `clt prepare` reads: text files, JSONL and Parquet (or a `datasets` save_to_disk folder).

`plan_parts` checks every input up front and cuts the inputs into `Part`s (small, picklable ranges of documents
in document order), so a bad path fails before any work starts and several workers can read one large file.
`iter_documents` streams the documents of one part; a bad record raises `InputError` naming the file and line
(or row), or is handed to `on_bad` and skipped. Compressed JSONL and text (`.gz`, `.zst`) are read as streams.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
import re
import zlib
from typing import IO, Any, Callable, Iterator, Sequence

FORMATS = ("text", "jsonl", "parquet")
SPLITS = ("file", "paragraph")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_MAGIC = {".gz": b"\x1f\x8b", ".zst": b"\x28\xb5\x2f\xfd"}
_BOM = b"\xef\xbb\xbf"
_SKIP = "fix it or pass --skip-bad"


class InputError(ValueError):
    """Input that cannot be read; a one-line message naming the file (and line/row) and the fix."""


@dataclasses.dataclass(frozen=True)
class Part:
    """A contiguous range of documents of the inputs: the unit of work of one prepare worker. Picklable, small."""
    kind: str                 # "text" | "jsonl" | "parquet" | "arrow"
    files: tuple[str, ...]    # text: consecutive files grouped into one part; other kinds: exactly one file
    start: int = 0            # jsonl: byte offset of the first line; parquet: first row group; arrow: first batch
    stop: int = -1            # exclusive end (byte offset / row group / batch); -1 = to the end of the file
    first_line: int = 1       # jsonl: 1-based line number of the part's first line (for error messages)
    size: int = 0             # input bytes this part covers (for a progress bar total)

    def describe(self) -> str:
        """Where this part lies in the inputs, for progress and error messages."""
        name = self.files[0]
        if self.kind == "text":
            return name if len(self.files) == 1 else f"{name} .. {self.files[-1]} ({len(self.files)} files)"
        if self.start == 0 and self.stop == -1:
            return name
        if self.kind == "jsonl":
            end = "end" if self.stop == -1 else self.stop
            return f"{name} lines {self.first_line}-... (bytes {self.start}-{end})"
        unit = "row groups" if self.kind == "parquet" else "record batches"
        return f"{name} {unit} {self.start}-{'end' if self.stop == -1 else self.stop - 1}"


# ----------------------------------------------------------------------------------------------------------
# Planning.
# ----------------------------------------------------------------------------------------------------------
def _expand(inputs: Sequence[str]) -> list[str]:
    """Globs become their sorted matches (pattern order kept); duplicates go, so no document is read twice."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise InputError("no inputs: pass files, globs such as 'data/*.jsonl', or (parquet) a datasets folder")
    paths: list[str] = []
    seen: set[str] = set()
    for pattern in map(os.fspath, inputs):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"{pattern} matches no file: check the pattern (quote it so the shell does not "
                                 "expand it)")
        elif not os.path.exists(pattern):
            raise InputError(f"{pattern} does not exist: check the path")
        else:
            matches = [pattern]
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _compression(path: str) -> str:
    """'.gz', '.zst' or '' from the name's suffix."""
    suffix = os.path.splitext(path)[1].lower()
    return suffix if suffix in _MAGIC else ""


def _check_file(path: str) -> int:
    """A readable file whose compressed data (by suffix) starts as it should; its size in bytes."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder: pass the files in it or a glob, e.g. '{os.path.join(path, '*')}'")
    comp = _compression(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"{path} cannot be read ({e.strerror}): check its permissions") from e
    if comp and head and not head.startswith(_MAGIC[comp]):
        raise InputError(f"{path} is not {comp[1:]} data though its name ends in {comp}: rename or recompress it")
    return os.path.getsize(path)


def _text_parts(paths: list[str], part_bytes: int) -> list[Part]:
    """Consecutive files grouped until a part holds part_bytes, so thousands of small files are a few parts."""
    parts: list[Part] = []
    group: list[str] = []
    size = 0
    for path in paths:
        group.append(path)
        size += _check_file(path)
        if size >= part_bytes:
            parts.append(Part("text", tuple(group), size=size))
            group, size = [], 0
    if group:
        parts.append(Part("text", tuple(group), size=size))
    return parts


def _jsonl_parts(path: str, part_bytes: int) -> list[Part]:
    """Uncompressed files are cut at the line starting at or after each multiple of part_bytes; first_line
    comes from counting newlines (one streaming pass). Compressed files cannot seek: one part each."""
    size = _check_file(path)
    if _compression(path) or size <= part_bytes:
        return [Part("jsonl", (path,), size=size)]
    cuts = [0]
    with open(path, "rb") as f:
        target = part_bytes
        while target < size:
            f.seek(target - 1)
            f.readline()  # to the end of the line holding byte target-1: the next line starts at or after target
            cut = f.tell()
            if cut >= size:
                break
            cuts.append(cut)
            target = (cut // part_bytes + 1) * part_bytes
        lines = [1]
        for a, b in zip(cuts, cuts[1:]):
            lines.append(lines[-1] + _count_newlines(f, a, b))
    stops = cuts[1:] + [-1]
    return [Part("jsonl", (path,), start=a, stop=b, first_line=n, size=(size if b == -1 else b) - a)
            for a, b, n in zip(cuts, stops, lines)]


def _count_newlines(f: IO[bytes], start: int, stop: int) -> int:
    """Newlines in bytes [start, stop), read in 1 MiB chunks."""
    f.seek(start)
    count, left = 0, stop - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _pyarrow() -> Any:
    """pyarrow (with .parquet and .ipc loaded), imported only when Parquet or Arrow is read."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise InputError("reading Parquet needs pyarrow: pip install 'clt[data]'") from e
    return pyarrow


def _parquet_parts(path: str, part_bytes: int) -> list[Part]:
    """Row groups grouped until a part holds part_bytes (compressed sizes from the file's metadata)."""
    _check_file(path)
    pa = _pyarrow()
    try:
        meta = pa.parquet.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a Parquet file ({str(e).splitlines()[0]}): pass .parquet files or a "
                         "datasets save_to_disk folder") from e
    parts: list[Part] = []
    first, size = 0, 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        size += sum(group.column(j).total_compressed_size for j in range(group.num_columns))
        if size >= part_bytes or i == meta.num_row_groups - 1:
            parts.append(Part("parquet", (path,), start=first, stop=i + 1, size=size))
            first, size = i + 1, 0
    return parts


def _arrow_parts(folder: str) -> list[Part]:
    """A `datasets` save_to_disk folder: one part per Arrow stream file, in the order state.json lists them."""
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        try:
            with open(os.path.join(folder, "dataset_dict.json")) as f:
                splits = list(json.load(f)["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        example = os.path.join(folder, splits[0] if splits else "train")
        raise InputError(f"{folder} holds a DatasetDict (splits: {', '.join(splits) or '?'}): pass one split's "
                         f"folder, e.g. {example}")
    state = os.path.join(folder, "state.json")
    if not os.path.exists(state):
        raise InputError(f"{folder} is a folder but not a datasets save_to_disk folder (no state.json): pass its "
                         f"Parquet files, e.g. '{os.path.join(folder, '*.parquet')}'")
    try:
        with open(state) as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{state} is not a datasets state file (no _data_files list): save the dataset again "
                         "with Dataset.save_to_disk") from e
    parts = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise InputError(f"{path} is listed in {state} but missing: copy the whole folder again")
        parts.append(Part("arrow", (path,), size=os.path.getsize(path)))
    return parts


def plan_parts(kind: str, inputs: Sequence[str], *, part_bytes: int = 64 << 20) -> list[Part]:
    """Expand globs (sorted matches per pattern, pattern order kept, duplicates removed), check every input, and cut
    the inputs into parts in document order. Deterministic: a pure function of the files' contents and part_bytes."""
    if kind not in FORMATS:
        raise InputError(f"unknown input format {kind!r}: use one of {', '.join(FORMATS)}")
    if part_bytes < 1:
        raise InputError(f"part_bytes {part_bytes} is not positive: use e.g. {64 << 20}")
    paths = _expand(inputs)
    if kind == "text":
        return _text_parts(paths, part_bytes)
    parts: list[Part] = []
    for path in paths:
        if kind == "jsonl":
            parts += _jsonl_parts(path, part_bytes)
        elif os.path.isdir(path):
            parts += _arrow_parts(path)
        else:
            parts += _parquet_parts(path, part_bytes)
    return parts


# ----------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------
class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a .zst file, frame after frame. zstandard's stream_reader ends quietly in the middle
    of a truncated frame (the documents would just stop); this raises EOFError there instead."""

    def __init__(self, raw: IO[bytes]) -> None:
        try:
            import zstandard
        except ImportError as e:
            raw.close()
            raise InputError("reading .zst files needs zstandard: pip install 'clt[data]'") from e
        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._obj: Any = None  # None: between frames
        self._out, self._pos = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._obj is not None:
                    raise EOFError("the zstd stream ends in the middle of a frame")
                return 0
            self._out, self._pos = memoryview(self._decompress(chunk)), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._obj = self._obj or self._new()
            out.append(self._obj.decompress(data))
            data = b""
            if self._obj.eof:  # the frame is complete; what follows starts the next one
                data, self._obj = self._obj.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open(path: str) -> IO[bytes]:
    """The file's bytes, decompressed as its suffix says (.gz, .zst), as a buffered stream for line reading."""
    comp = _compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    raw = open(path, "rb")
    return io.BufferedReader(_ZstdReader(raw)) if comp == ".zst" else raw


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a corrupted or unreadable (compressed) stream raises: input errors, not record errors."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL part: the lines whose first byte lies in [start, stop)."""
    path = part.files[0]
    number, pos = part.first_line, part.start
    try:
        with _open(path) as f:
            if part.start:
                f.seek(part.start)
            while part.stop == -1 or pos < part.stop:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                if number == 1 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                yield number, line
                number += 1
    except _stream_errors() as e:
        raise InputError(f"{path} cannot be read after line {number - 1} ({e}): the file is damaged or "
                         "truncated; restore or recompress it") from e


def _kind_of(value: object) -> str:
    """A JSON value's type in JSON's words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _jsonl_record(line: bytes, field: str) -> str:
    """The document of one JSONL line; raises ValueError with the reason and the fix (no file or line)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}): {_SKIP}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}): fix the line or pass --skip-bad") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{_kind_of(obj)}, not a JSON object: each line must be an object such as "
                         f'{{"{field}": "..."}}')
    if field not in obj:
        keys = list(obj)
        shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
        raise ValueError(f"no field {field!r} (fields: {shown or 'none'}): pass --field NAME")
    value = obj[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is {_kind_of(value)}, not a string: pass --field NAME of a text field")
    if not value.strip():
        raise ValueError(f"field {field!r} is empty: remove the line or pass --skip-bad")
    return value


def _jsonl_documents(part: Part, field: str, bad: Callable[[str], None]) -> Iterator[str]:
    """JSONL lines to documents; blank lines are skipped silently."""
    for number, line in _lines(part):
        if not line.strip():
            continue
        try:
            doc = _jsonl_record(line, field)
        except ValueError as e:
            bad(f"{part.files[0]} line {number}: {e}")
            continue
        yield doc


def _read_text(path: str) -> bytes:
    """A whole text file, decompressed (a text document is whole by definition)."""
    try:
        with _open(path) as f:
            return f.read()
    except _stream_errors() as e:
        raise InputError(f"{path} cannot be read ({e}): the file is damaged or truncated; restore or "
                         "recompress it") from e


def _text_documents(part: Part, split: str, bad: Callable[[str], None]) -> Iterator[str]:
    """Each file is one document (split='file') or holds documents separated by blank lines ('paragraph')."""
    for path in part.files:
        data = _read_text(path)
        try:
            text = data.decode("utf-8-sig")  # -sig: a leading byte-order mark is not content
        except UnicodeDecodeError as e:
            bad(f"{path} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}): convert it, e.g. "
                f"iconv -t UTF-8, or pass --skip-bad")
            continue
        docs = [text] if split == "file" else [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
        docs = [d for d in docs if d.strip()]
        if not docs:
            bad(f"{path} holds no text (empty or whitespace only): remove it from the inputs or pass --skip-bad")
        yield from docs


def _string_column(path: str, schema: Any, field: str) -> None:
    """The field must be a string column of the file; the message lists the columns there are."""
    pa = _pyarrow()
    if field not in schema.names:
        raise InputError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}): pass --field NAME")
    typ = schema.field(field).type
    string_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or string_view(typ)):
        raise InputError(f"{path} column {field!r} is {typ}, not a string: pass --field NAME of a text column")


def _column_values(path: str, field: str, batches: Iterator[Any], first_row: int,
                   bad: Callable[[str], None]) -> Iterator[str]:
    """Documents of one column, batch by batch; rows are numbered from 0 within the file, as datasets does."""
    row = first_row
    for batch in batches:
        for value in batch.column(field).to_pylist():
            if value is None or not value.strip():
                bad(f"{path} row {row}: column {field!r} is {'null' if value is None else 'empty'}: "
                    "remove the row or pass --skip-bad")
            else:
                yield value
            row += 1


def _parquet_documents(part: Part, field: str, bad: Callable[[str], None]) -> Iterator[str]:
    """The row groups [start, stop) of a Parquet file, reading only the field's column."""
    pa = _pyarrow()
    path = part.files[0]
    try:
        pf = pa.parquet.ParquetFile(path)
        _string_column(path, pf.schema_arrow, field)
        stop = pf.metadata.num_row_groups if part.stop == -1 else part.stop
        first_row = sum(pf.metadata.row_group(i).num_rows for i in range(part.start))
        batches = pf.iter_batches(row_groups=list(range(part.start, stop)), columns=[field])
        yield from _column_values(path, field, batches, first_row, bad)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} cannot be read ({str(e).splitlines()[0]}): the file is damaged; restore it") from e


def _arrow_documents(part: Part, field: str, bad: Callable[[str], None]) -> Iterator[str]:
    """The record batches [start, stop) of an Arrow IPC stream file (a datasets save_to_disk shard)."""
    pa = _pyarrow()
    path = part.files[0]
    try:
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_stream(source)
            _string_column(path, reader.schema, field)
            batches, skipped = iter(reader), 0
            for batch in itertools.islice(batches, part.start):  # a stream cannot seek: read past them
                skipped += batch.num_rows
            count = None if part.stop == -1 else max(part.stop - part.start, 0)
            yield from _column_values(path, field, itertools.islice(batches, count), skipped, bad)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} cannot be read as an Arrow stream ({str(e).splitlines()[0]}): save the dataset "
                         "again with Dataset.save_to_disk") from e


def iter_documents(part: Part, *, field: str = "text", split: str = "file",
                   on_bad: Callable[[str], None] | None = None) -> Iterator[str]:
    """The documents (str) of one part, in order. split ("file"|"paragraph") applies to kind "text" only.
    A bad record (malformed JSONL line, missing/non-string/empty field, undecodable text) raises InputError
    naming file and line (or row), unless on_bad is given: then on_bad(message) is called and the record skipped."""
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")

    def bad(message: str) -> None:
        if on_bad is None:
            raise InputError(message)
        on_bad(message)

    if part.kind == "text":
        return _text_documents(part, split, bad)
    if part.kind == "jsonl":
        return _jsonl_documents(part, field, bad)
    if part.kind == "parquet":
        return _parquet_documents(part, field, bad)
    if part.kind == "arrow":
        return _arrow_documents(part, field, bad)
    raise InputError(f"unknown part kind {part.kind!r}: plan parts with plan_parts")
