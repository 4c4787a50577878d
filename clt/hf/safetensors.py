"""Safetensors files: a memory-mapped reader and a streaming, sharded writer (numpy and ml_dtypes only).

Why not the `safetensors` package: its numpy API has no bfloat16, it reads whole tensors, and its writers take
the whole state dict at once. Here a tensor is a read-only view into a memory map, so `array(name)[a:b]` reads
only those bytes and a model larger than host memory loads shard by shard onto devices; the writer takes each
tensor's name, shape and dtype up front with a function producing its data, so it holds one tensor at a time.

The format (the public safetensors spec): an 8-byte little-endian u64 N, an N-byte UTF-8 JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data buffer;
offsets are relative to the buffer's start, data is little-endian in C order. A model folder holds one
`model.safetensors`, or shards `model-00001-of-00003.safetensors`, ... with `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}), the layout `transformers` reads and writes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
import struct
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers refuses to load a file whose metadata lacks "format"
DEFAULT_METADATA = {"format": "pt"}

# The one table of safetensors dtype names; every numpy dtype is little-endian, the format's byte order.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Every file name write_sharded produces, so that a later write can remove the ones it does not overwrite.
_WRITTEN_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


class SafetensorsError(ValueError):
    """A safetensors file or folder that cannot be read or written; the message names the path and the fix."""


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a numpy dtype ('F32', 'BF16', ...); an error for dtypes the format lacks."""
    name = _DTYPE_NAMES.get(np.dtype(dtype))
    if name is None:
        raise SafetensorsError(f"dtype {np.dtype(dtype)} has no safetensors name; use one of "
                               f"{[str(d) for d in DTYPES.values()]} (little-endian)")
    return name


@dataclasses.dataclass(frozen=True)
class _Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data buffer
    end: int


class TensorFile:
    """One .safetensors file: the header is parsed and checked on open, tensors are read-only memory-map views.

    Nothing but the header is read until a tensor's bytes are touched, so `array(name)[a:b]` reads only rows a..b.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._entries, self.metadata, self._data_start, self._size = _read_header(self.path)
        self._buffer: np.memmap | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the file's memory map (no copy; slices read only their bytes)."""
        entry = self._entry(name)
        if self._buffer is None:
            # One map of the whole file, made on first use; each tensor is a view into it.
            self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
            if len(self._buffer) != self._size:
                raise SafetensorsError(f"{self.path} changed size since it was opened ({self._size} -> "
                                       f"{len(self._buffer)} bytes); open it again")
        start = self._data_start
        return self._buffer[start + entry.begin:start + entry.end].view(entry.dtype).reshape(entry.shape)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise _unknown_tensor(name, self.names, str(self.path))
        return entry


class TensorSet:
    """A model folder's weights by tensor name, across its files.

    The files are those `model.safetensors.index.json` names when the folder has one (the index is what
    transformers reads, so stray files beside it are ignored), else every `*.safetensors` file in the folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise SafetensorsError(f"{self.folder} is not a folder; give the folder holding model.safetensors "
                                   f"or {INDEX_FILE} and its shards")
        index_path = self.folder / INDEX_FILE
        weight_map = _read_weight_map(index_path) if index_path.exists() else None
        if weight_map is not None:
            paths = [self.folder / name for name in sorted(set(weight_map.values()))]
            for path in paths:
                if not path.is_file():
                    raise SafetensorsError(f"{index_path} names {path.name}, which is missing from {self.folder}; "
                                           "the download is incomplete: fetch every file the index lists")
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
            if not paths:
                raise SafetensorsError(f"{self.folder} holds no *.safetensors file; a model folder needs "
                                       f"model.safetensors, or {INDEX_FILE} and the shards it lists")
        self._file_of: dict[str, TensorFile] = {}
        for path in paths:
            tensor_file = TensorFile(path)
            for name in tensor_file.names:
                other = self._file_of.get(name)
                if other is not None:
                    raise SafetensorsError(f"tensor {name!r} is in both {other.path} and {tensor_file.path}; "
                                           "remove the stale file (or fix the index) so each tensor is stored once")
                self._file_of[name] = tensor_file
        for name, file_name in (weight_map or {}).items():
            tensor_file = self._file_of.get(name)
            if tensor_file is None or tensor_file.path.name != file_name:
                found = f"it is in {tensor_file.path.name}" if tensor_file else "no listed file holds it"
                raise SafetensorsError(f"{index_path} maps {name!r} to {file_name}, but {found}; the index and "
                                       "shards come from different exports: fetch them again")

    @property
    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> pathlib.Path:
        return self._tensor_file(name).path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor_file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._tensor_file(name).dtype(name)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-map view (see TensorFile.array)."""
        return self._tensor_file(name).array(name)

    def _tensor_file(self, name: str) -> TensorFile:
        tensor_file = self._file_of.get(name)
        if tensor_file is None:
            raise _unknown_tensor(name, self.names, str(self.folder))
        return tensor_file


def write_sharded(
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    folder: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
) -> list[pathlib.Path]:
    """Write (name, shape, dtype, produce) tensors into `folder` as safetensors shards; return the files written.

    Shapes and dtypes come up front so every header is known before any data exists; each `produce()` is called
    once, when its tensor is written, and its array is dropped before the next one is produced, so the whole
    model is never in memory. Tensors fill shards in the given order; a shard ends when the next tensor would
    push its tensor bytes past `max_shard_bytes` (a larger tensor gets a shard of its own). One shard is written
    as model.safetensors; several as model-00001-of-0000N.safetensors, ... plus model.safetensors.index.json.
    `metadata` defaults to {"format": "pt"}, which transformers requires.

    Every file is written under a temporary name and renamed only after all of them are complete, so a failing
    `produce()` leaves the folder as it was. Files of an earlier write that this one does not overwrite (other
    shard counts, a stale index) are then deleted, as transformers does, so they never mix with the new weights.
    """
    folder = pathlib.Path(folder)
    if max_shard_bytes <= 0:
        raise SafetensorsError(f"max_shard_bytes for {folder} is {max_shard_bytes}; give a positive byte count")
    metadata = _checked_metadata(metadata, folder)
    specs = _checked_specs(tensors, folder)
    shards = _pack(specs, max_shard_bytes)
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[pathlib.Path] = []
    try:
        for name, shard in zip(names, shards):
            path = folder / name
            staged.append(_write_staged(path, lambda f: _write_tensors(f, path, shard, metadata)))
        if count > 1:
            index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)},
                     "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
            index_bytes = (json.dumps(index, indent=2) + "\n").encode("utf-8")
            staged.append(_write_staged(folder / INDEX_FILE, lambda f: f.write(index_bytes)))
            names.append(INDEX_FILE)
        for staged_path, name in zip(staged, names):
            os.replace(staged_path, folder / name)
    except BaseException:
        for staged_path in staged:
            staged_path.unlink(missing_ok=True)
        raise
    for stale in folder.iterdir():
        if _WRITTEN_NAME.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    return [folder / name for name in names]


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Write in-memory arrays to one .safetensors file (atomically: a temporary name, renamed when complete)."""
    path = pathlib.Path(path)
    metadata = _checked_metadata(metadata, path)
    arrays = {name: np.asarray(array) for name, array in tensors.items()}
    specs = _checked_specs(((name, a.shape, a.dtype, lambda a=a: a) for name, a in arrays.items()), path)
    staged = _write_staged(path, lambda f: _write_tensors(f, path, specs, metadata))
    os.replace(staged, path)
    return path


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(path: pathlib.Path) -> tuple[dict[str, _Entry], dict[str, str], int, int]:
    """Parse and check a file's header: (entries, metadata, data buffer start, file size)."""
    damaged = "the file is truncated or damaged: download or export it again"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{path} is {size} bytes, shorter than the 8-byte header length; {damaged}")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise SafetensorsError(f"{path}: its header length {header_len} runs past the end of the file "
                                       f"({size} bytes); {damaged}")
            raw = f.read(header_len)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}; check the path") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: the header is not UTF-8 JSON ({e}); {damaged}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object; {damaged}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ is not a {{str: str}} object; {damaged}")
    buffer_size = size - 8 - header_len
    entries = {name: _parse_entry(path, name, info, buffer_size) for name, info in header.items()}
    spans = sorted((entry.begin, entry.end, name) for name, entry in entries.items())
    for (begin0, end0, name0), (begin1, end1, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise SafetensorsError(f"{path}: tensors {name0!r} (bytes {begin0}..{end0}) and {name1!r} "
                                   f"(bytes {begin1}..{end1}) overlap; {damaged}")
    return entries, metadata, 8 + header_len, size


def _parse_entry(path: pathlib.Path, name: str, info: Any, buffer_size: int) -> _Entry:
    where = f"{path}: tensor {name!r}"
    damaged = "the file is truncated or damaged: download or export it again"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where} has header entry {info!r}, not an object with dtype, shape and "
                               f"data_offsets; {damaged}")
    dtype = DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise SafetensorsError(f"{where} has dtype {info.get('dtype')!r}, which this reader does not support "
                               f"(it reads {sorted(DTYPES)}); convert the tensor when exporting")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _is_int_list(shape) or any(d < 0 for d in shape):
        raise SafetensorsError(f"{where} has shape {shape!r}, not a list of non-negative integers; {damaged}")
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise SafetensorsError(f"{where} has data_offsets {offsets!r}, not [begin, end]; {damaged}")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise SafetensorsError(f"{where} has data_offsets [{begin}, {end}] outside the file's {buffer_size}-byte "
                               f"data buffer; {damaged}")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise SafetensorsError(f"{where} has data_offsets spanning {end - begin} bytes, but shape {shape} of "
                               f"{dtype} needs {nbytes}; {damaged}")
    return _Entry(dtype, tuple(shape), begin, end)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)  # not bool, which is an int subclass


def _read_weight_map(index_path: pathlib.Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"cannot read {index_path}: {e}; download or export it again") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{index_path} has no weight_map {{tensor name: file name}}; download or export "
                               "it again")
    return weight_map


def _unknown_tensor(name: str, names: list[str], where: str) -> SafetensorsError:
    close = difflib.get_close_matches(name, names, n=5)
    hint = f"close names: {close}" if close else f"it has {len(names)} tensors, e.g. {names[:5]}"
    return SafetensorsError(f"no tensor {name!r} in {where}; {hint}")


def _checked_metadata(metadata: dict[str, str] | None, where: pathlib.Path) -> dict[str, str]:
    if metadata is None:
        return dict(DEFAULT_METADATA)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"metadata for {where} must map str to str, got {metadata!r}; convert the values "
                               "to strings (e.g. json.dumps)")
    return dict(metadata)


def _checked_specs(tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], Any]]],
                   where: pathlib.Path) -> list[_Spec]:
    specs: list[_Spec] = []
    seen: set[str] = set()
    for name, shape, dtype, produce in tensors:
        if not isinstance(name, str) or name == "__metadata__" or name in seen:
            problem = "is given twice" if isinstance(name, str) and name in seen else "is not a valid tensor name"
            raise SafetensorsError(f"tensor {name!r} for {where} {problem}; give each tensor one unique str name")
        try:
            dtype = np.dtype(dtype)
            dtype_name(dtype)
        except (TypeError, SafetensorsError) as e:
            raise SafetensorsError(f"tensor {name!r} for {where}: {e}") from e
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise SafetensorsError(f"tensor {name!r} for {where} has shape {shape}; dimensions must be >= 0")
        seen.add(name)
        specs.append(_Spec(name, shape, dtype, produce))
    return specs


def _pack(specs: list[_Spec], max_shard_bytes: int) -> list[list[_Spec]]:
    """Split specs, in order, into shards of at most max_shard_bytes tensor bytes (an oversized tensor alone)."""
    shards: list[list[_Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: list[_Spec], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header, padded with spaces so the data buffer starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_staged(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> pathlib.Path:
    """Run `write` on a new temporary file next to `path` and return its name; on any error it is removed."""
    staged = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(staged, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def _write_tensors(f: BinaryIO, path: pathlib.Path, specs: list[_Spec], metadata: dict[str, str]) -> None:
    f.write(_header_bytes(specs, metadata))
    for spec in specs:
        _write_tensor(f, path, spec)


def _write_tensor(f: BinaryIO, path: pathlib.Path, spec: _Spec) -> None:
    """Produce one tensor, check it against its declaration and write its bytes.

    A function of its own so the array is dropped on return, before the next tensor is produced.
    """
    array = np.asarray(spec.produce())
    if array.shape != spec.shape or array.dtype != spec.dtype:
        raise SafetensorsError(f"{path}: tensor {spec.name!r} was declared {spec.dtype} {spec.shape}, but its data "
                               f"is {array.dtype} {array.shape}; fix the declaration or the function producing it")
    f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
