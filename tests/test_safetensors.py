"""clt's safetensors reader and writer against the reference `safetensors` package (and torch for bfloat16)."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from clt.hf.safetensors import INDEX_FILE, SafetensorsError, TensorFile, TensorSet, write_file, write_sharded

st_numpy = pytest.importorskip("safetensors.numpy")

ARRAYS = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "f16": np.linspace(-2, 2, 5, dtype=np.float16),
          "i64": np.array([[1, -2], [3, 2**40]], np.int64), "u8": np.arange(7, dtype=np.uint8),
          "scalar": np.array(3.5, np.float64), "empty": np.zeros((0, 3), np.float32)}


def test_reads_what_the_reference_package_writes(tmp_path):
    st_numpy.save_file(ARRAYS, str(tmp_path / "a.safetensors"), metadata={"format": "np"})
    f = TensorFile(tmp_path / "a.safetensors")
    assert f.names == sorted(ARRAYS) and f.metadata == {"format": "np"}
    for name, want in ARRAYS.items():
        got = f.array(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_the_reference_package_reads_what_clt_writes(tmp_path):
    write_file(tmp_path / "a.safetensors", ARRAYS)
    back = st_numpy.load_file(str(tmp_path / "a.safetensors"))
    assert sorted(back) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        np.testing.assert_array_equal(back[name], want)
    assert TensorFile(tmp_path / "a.safetensors").metadata == {"format": "pt"}  # transformers requires it
    (header_len,) = struct.unpack("<Q", (tmp_path / "a.safetensors").read_bytes()[:8])
    assert (8 + header_len) % 8 == 0  # the data buffer is 8-byte aligned


def test_bfloat16_bit_patterns_round_trip_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = torch.randn(4, 6).to(torch.bfloat16)
    st_torch.save_file({"w": t}, str(tmp_path / "t.safetensors"))
    ours = TensorFile(tmp_path / "t.safetensors").array("w")
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    write_file(tmp_path / "o.safetensors", {"w": np.asarray(ours)})
    assert torch.equal(st_torch.load_file(str(tmp_path / "o.safetensors"))["w"], t)


def test_a_slice_reads_from_the_memory_map_without_a_copy(tmp_path):
    big = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)
    write_file(tmp_path / "a.safetensors", {"big": big})
    view = TensorFile(tmp_path / "a.safetensors").array("big")
    part = view[10:12]
    assert np.shares_memory(part, view) and part.base is not None  # a view of the map, not a copy
    assert not part.flags.owndata and not part.flags.writeable
    np.testing.assert_array_equal(part, big[10:12])


def specs(arrays):
    return [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]


def test_sharded_writes_split_at_the_limit_with_an_index(tmp_path):
    arrays = {f"w{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    arrays["huge"] = np.ones((40, 10), np.float32)  # 1600 bytes: over the limit, alone in its shard
    files = write_sharded(specs(arrays), tmp_path, max_shard_bytes=1000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] and len(files) == 5
    assert index["weight_map"]["huge"] == shards[-1] and index["metadata"]["total_size"] == 5 * 400 + 1600
    for shard in shards[:-1]:
        f = TensorFile(tmp_path / shard)
        assert sum(f.array(n).nbytes for n in f.names) <= 1000
    got = TensorSet(tmp_path)
    assert got.names == sorted(arrays)
    for name, want in arrays.items():
        np.testing.assert_array_equal(got.array(name), want)
    # one shard: model.safetensors and no index (a stale index and shards are removed)
    write_sharded(specs(arrays), tmp_path, max_shard_bytes=10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_failing_producer_leaves_the_folder_as_it_was(tmp_path):
    write_sharded(specs({"a": np.ones(3, np.float32)}), tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_sharded([("a", (3,), np.float32, broken)], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before
    with pytest.raises(SafetensorsError, match=r"tensor 'a' was declared float32 \(4,\), but its data is float32 "
                                               r"\(3,\)"):
        write_sharded([("a", (4,), np.float32, lambda: np.ones(3, np.float32))], tmp_path)


def damaged(tmp_path, name, mutate):
    write_file(tmp_path / "ok.safetensors", {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)})
    raw = bytearray((tmp_path / "ok.safetensors").read_bytes())
    (tmp_path / name).write_bytes(mutate(raw))
    return tmp_path / name


def _header(raw: bytearray) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _with_header(raw: bytearray, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(raw[8 + n:])


@pytest.mark.parametrize("mutate, pattern", [
    (lambda raw: bytes(raw[:5]), r"is 5 bytes, shorter than the 8-byte header length"),
    (lambda raw: struct.pack("<Q", 10**9) + bytes(raw[8:]), r"header length 1000000000 runs past the end"),
    (lambda raw: bytes(raw[:8]) + b"{" * _header(raw)[0] + bytes(raw[8 + _header(raw)[0]:]), r"not UTF-8 JSON"),
    (lambda raw: _with_header(raw, {**_header(raw)[1], "a": {**_header(raw)[1]["a"], "data_offsets": [0, 10**6]}}),
     r"tensor 'a' has data_offsets \[0, 1000000\] outside the file's"),
    (lambda raw: _with_header(raw, {**_header(raw)[1], "a": {**_header(raw)[1]["a"], "dtype": "Q7"}}),
     r"tensor 'a' has dtype 'Q7', which this reader does not support"),
    (lambda raw: _with_header(raw, {**_header(raw)[1], "b": {**_header(raw)[1]["b"], "data_offsets": [8, 20]}}),
     r"overlap"),
])
def test_a_damaged_file_is_an_error_naming_it(tmp_path, mutate, pattern):
    path = damaged(tmp_path, "bad.safetensors", mutate)
    with pytest.raises(SafetensorsError, match=pattern) as e:
        TensorFile(path)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_folder_errors(tmp_path):
    with pytest.raises(SafetensorsError, match=r"holds no \*.safetensors file"):
        TensorSet(tmp_path)
    write_sharded(specs({f"w{i}": np.ones(100, np.float32) for i in range(3)}), tmp_path / "m", max_shard_bytes=500)
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SafetensorsError, match=r"names model-00002-of-00003.safetensors, which is missing"):
        TensorSet(tmp_path / "m")
    (tmp_path / "d").mkdir()
    write_file(tmp_path / "d" / "x.safetensors", {"w": np.ones(2, np.float32)})
    write_file(tmp_path / "d" / "y.safetensors", {"w": np.ones(2, np.float32)})
    with pytest.raises(SafetensorsError, match=r"tensor 'w' is in both .*x.safetensors and .*y.safetensors"):
        TensorSet(tmp_path / "d")
    write_file(tmp_path / "e.safetensors", {"weight": np.ones(2, np.float32)})
    with pytest.raises(SafetensorsError, match=r"no tensor 'weights' in .*; close names: \['weight'\]"):
        TensorFile(tmp_path / "e.safetensors").array("weights")


def test_bad_tensor_names_are_safetensors_errors(tmp_path):
    one = lambda: np.ones(1, np.float32)  # noqa: E731
    for tensors, pattern in (([("a", (1,), np.float32, one)] * 2, "tensor 'a' .* is given twice"),
                             ([(["a"], (1,), np.float32, one)], r"tensor \['a'\] .* is not a valid tensor name"),
                             ([("__metadata__", (1,), np.float32, one)], "is not a valid tensor name")):
        with pytest.raises(SafetensorsError, match=pattern):
            write_sharded(tensors, tmp_path / "m")
    assert not (tmp_path / "m").exists()
