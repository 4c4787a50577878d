"""clt.data.inputs: every input format gives the same documents in the same order, large JSONL files cut into
parts read back to the same documents with true line numbers, and each kind of bad input fails with a one-line
message that names the file (and line or row) and the fix."""

import gzip
import json
import pathlib
import pickle
import sys

import pytest

from clt.data.inputs import FORMATS, InputError, Part, iter_documents, plan_parts

# Unicode, multi-line text, blank lines inside a document, quotes and backslashes, surrounding spaces.
DOCS = [
    "Plain first document.",
    "Zweites Dokument: Größe, Übermaß — naïve café, 日本語のテキスト, emoji 🙂 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "line one\nline two\n\nafter a blank line\n",
    '  leading spaces, "quotes", a back\\slash and a tab\t',
    "def f(x):\n    return x + 1\n",
] + [f"document {i}: " + "word " * (i % 7 + 1) for i in range(40)]


def read_all(kind: str, inputs, *, part_bytes: int = 64 << 20, **kwargs) -> list[str]:
    return [doc for part in plan_parts(kind, inputs, part_bytes=part_bytes) for doc in iter_documents(part, **kwargs)]


def jsonl_bytes(docs, *, blank_every: int = 0) -> bytes:
    lines = []
    for i, doc in enumerate(docs):
        lines.append(json.dumps({"id": i, "text": doc}, ensure_ascii=i % 2 == 0))
        if blank_every and i % blank_every == 0:
            lines.append("   ")  # blank lines are skipped, but still count for line numbers
    return ("\n".join(lines) + "\n").encode()


def zstd(data: bytes) -> bytes:
    """Two frames, as `cat a.zst b.zst` makes: the reader must go on across frames."""
    zstandard = pytest.importorskip("zstandard")
    half = len(data) // 2
    return zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])


def expect_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        result = fn(*args, **kwargs)
        if not isinstance(result, list):
            list(result)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------------
# The same corpus in every format.
# ----------------------------------------------------------------------------------------------------------
def test_every_format_gives_the_same_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for i, doc in enumerate(DOCS):  # some text files compressed: the glob below takes all of them, in name order
        data = doc.encode()
        if i % 3 == 1:
            (text_dir / f"{i:03d}.txt.gz").write_bytes(gzip.compress(data))
        elif i % 5 == 2:
            (text_dir / f"{i:03d}.txt.zst").write_bytes(zstd(data))
        else:
            (text_dir / f"{i:03d}.txt").write_bytes(("\ufeff" if i == 0 else "").encode() + data)
    raw = jsonl_bytes(DOCS, blank_every=4)
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + raw)  # a byte-order mark is not content
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstd(raw))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}).save_to_disk(
        str(tmp_path / "ds"), num_shards=3)

    text_parts = plan_parts("text", [str(text_dir / "*.txt*")], part_bytes=200)
    assert 1 < len(text_parts) < len(DOCS)  # small files grouped
    assert sum(len(p.files) for p in text_parts) == len(DOCS)
    assert read_all("text", [str(text_dir / "*.txt*")], part_bytes=200) == DOCS
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        assert read_all("jsonl", [str(tmp_path / name)]) == DOCS, name
    parquet_parts = plan_parts("parquet", [str(tmp_path / "c.parquet")], part_bytes=1)
    assert [(p.start, p.stop) for p in parquet_parts] == [(i, i + 1) for i in range(7)]  # 45 rows / 7 per group
    assert read_all("parquet", [str(tmp_path / "c.parquet")], part_bytes=1) == DOCS
    assert read_all("parquet", [str(tmp_path / "c.parquet")]) == DOCS
    arrow_parts = plan_parts("parquet", [str(tmp_path / "ds")])
    assert [p.kind for p in arrow_parts] == ["arrow"] * 3
    assert read_all("parquet", [str(tmp_path / "ds")]) == DOCS


def test_parts_are_small_picklable_and_deterministic(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(DOCS))
    parts = plan_parts("jsonl", [str(path)], part_bytes=100)
    assert parts == plan_parts("jsonl", [str(path)], part_bytes=100)
    assert pickle.loads(pickle.dumps(parts)) == parts
    assert all(isinstance(p, Part) and p.kind == "jsonl" for p in parts)
    assert sum(p.size for p in parts) == path.stat().st_size
    assert parts[0].describe() == f"{path} lines 1-... (bytes 0-{parts[0].stop})"
    assert FORMATS == ("text", "jsonl", "parquet")


def test_globs_sorted_per_pattern_in_pattern_order_without_duplicates(tmp_path):
    for name, doc in [("b1.txt", "B1"), ("b2.txt", "B2"), ("a1.txt", "A1"), ("a2.txt", "A2")]:
        (tmp_path / name).write_text(doc)
    inputs = [str(tmp_path / "b*.txt"), str(tmp_path / "a*.txt"), str(tmp_path / "b1.txt")]
    assert read_all("text", inputs, part_bytes=1) == ["B1", "B2", "A1", "A2"]


def test_text_paragraph_split(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\n  \n second para \n\n\n\nthird\n\n")
    assert read_all("text", [str(tmp_path / "a.txt")], split="paragraph") == [
        "first para\nstill first", "second para", "third"]
    assert read_all("text", [str(tmp_path / "a.txt")]) == [(tmp_path / "a.txt").read_text()]


# ----------------------------------------------------------------------------------------------------------
# Cutting large JSONL files.
# ----------------------------------------------------------------------------------------------------------
def test_cut_jsonl_reads_the_same_documents_with_true_line_numbers(tmp_path):
    docs = list(DOCS)
    docs[7] = "a long document " * 20  # one line longer than several parts: the cuts inside it collapse
    path = tmp_path / "a.jsonl"
    data = jsonl_bytes(docs, blank_every=3)
    path.write_bytes(data)
    whole = plan_parts("jsonl", [str(path)])
    parts = plan_parts("jsonl", [str(path)], part_bytes=50)
    assert len(whole) == 1 and len(parts) > 10
    assert [d for p in parts for d in iter_documents(p)] == read_all("jsonl", [str(path)]) == docs
    # The cuts: each multiple of 50 moved forward to the next line start (a cut at the very end is no part).
    starts = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    cuts = {min(s for s in starts if s >= m) for m in range(50, len(data), 50)}
    assert [p.start for p in parts] == sorted({0} | cuts - {len(data)})
    for part, nxt in zip(parts, parts[1:] + [None]):
        assert part.first_line == data[:part.start].count(b"\n") + 1
        assert part.stop == (-1 if nxt is None else nxt.start)

    lines = data.split(b"\n")
    bad_line = len(lines) - 5  # 1-based number of a line in one of the last parts
    assert lines[bad_line - 1].startswith(b"{")
    lines[bad_line - 1] = b'{"text": "broken",}'
    path.write_bytes(b"\n".join(lines))
    parts = plan_parts("jsonl", [str(path)], part_bytes=50)
    messages: list[str] = []
    for part in parts:
        list(iter_documents(part, on_bad=messages.append))
    assert messages == [f"{path} line {bad_line}: not valid JSON (Expecting property name enclosed in double "
                        "quotes): fix the line or pass --skip-bad"]
    holder = [p for p in parts if p.start <= len(b"\n".join(lines[:bad_line - 1])) + 1][-1]
    assert holder is not parts[0]
    expect_error(f"line {bad_line}: not valid JSON", iter_documents, holder)


# ----------------------------------------------------------------------------------------------------------
# Bad records.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, match", [
    ('{"text": "a",}', r"line 2: not valid JSON \(Expecting property name"),
    ('{"id": 3, "body": "x"}', r"line 2: no field 'text' \(fields: id, body\): pass --field NAME"),
    ('{"text": "  \\n "}', r"line 2: field 'text' is empty"),
    ('{"text": 5}', r"line 2: field 'text' is a number, not a string"),
    ('{"text": null}', r"line 2: field 'text' is null, not a string"),
    ('["text"]', r"line 2: a list, not a JSON object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(f'{{"text": "good"}}\n{line}\n{{"text": "also good"}}\n'.encode()))
    message = expect_error(match, read_all, "jsonl", [str(path)])
    assert message.startswith(f"{path} line 2: ")


def test_on_bad_collects_messages_and_skips(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": ""}\nnot json\n{"text": "two"}\n\n{"body": "x"}\n'
                     b'{"text": "caf\xc3"}\n{"text": "three"}\n')
    messages: list[str] = []
    assert read_all("jsonl", [str(path)], on_bad=messages.append) == ["one", "two", "three"]
    assert [m.split(":")[0] for m in messages] == [f"{path} line {n}" for n in (2, 3, 6, 7)]
    assert "not UTF-8" in messages[3]
    assert read_all("jsonl", [str(path)], field="body", on_bad=lambda m: None) == ["x"]


def test_bad_text_files(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    expect_error(r"empty.txt holds no text", read_all, "text", [str(tmp_path / "empty.txt")])
    expect_error(r"latin1.txt is not UTF-8 \(byte 0xe9 at offset 3\)", read_all, "text",
                 [str(tmp_path / "latin1.txt")])
    messages: list[str] = []
    assert read_all("text", [str(tmp_path / "*.txt")], on_bad=messages.append) == ["fine"]
    assert len(messages) == 2


def test_bad_parquet_columns_and_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2, 3, 4], "text": ["a", None, "c", " ", "e"]}), path, row_group_size=2)
    expect_error(rf"^{path} has no column 'body' \(columns: id, text\): pass --field NAME$",
                 read_all, "parquet", [str(path)], field="body")
    expect_error(rf"^{path} column 'id' is int64, not a string", read_all, "parquet", [str(path)], field="id")
    messages: list[str] = []
    assert read_all("parquet", [str(path)], part_bytes=1, on_bad=messages.append) == ["a", "c", "e"]
    assert messages[0].startswith(f"{path} row 1: column 'text' is null")
    assert messages[1].startswith(f"{path} row 3: column 'text' is empty")  # row 3 is in the second part
    expect_error(rf"^{path} row 1: ", read_all, "parquet", [str(path)])


def test_missing_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    expect_error(r"reading Parquet needs pyarrow: pip install 'clt\[data\]'", plan_parts, "parquet", [str(path)])


# ----------------------------------------------------------------------------------------------------------
# Bad inputs (planning) and damaged files.
# ----------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_at_planning(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    expect_error(r"no inputs", plan_parts, "jsonl", [])
    expect_error(rf"^{tmp_path}/\*\.nothing matches no file", plan_parts, "jsonl", [str(tmp_path / "*.nothing")])
    expect_error(rf"^{tmp_path}/missing.jsonl does not exist", plan_parts, "jsonl", [str(tmp_path / "missing.jsonl")])
    message = expect_error(rf"^{tmp_path}/sub is a folder: pass the files in it or a glob", plan_parts, "jsonl",
                           [str(tmp_path / "sub")])
    assert str(tmp_path / "sub" / "*") in message
    expect_error(r"is a folder", plan_parts, "text", [str(tmp_path / "*")])  # a glob that matches a folder
    expect_error(r"unknown input format 'csv'", plan_parts, "csv", [str(tmp_path / "sub" / "a.jsonl")])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "x"}\n')
    expect_error(r"plain.jsonl.gz is not gz data", plan_parts, "jsonl", [str(tmp_path / "plain.jsonl.gz")])


def test_datasets_dict_folder_and_plain_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    expect_error(rf"^{tmp_path}/dd holds a DatasetDict \(splits: train, test\): pass one split's folder, e.g. "
                 rf"{tmp_path}/dd/train$", plan_parts, "parquet", [str(tmp_path / "dd")])
    assert read_all("parquet", [str(tmp_path / "dd" / "train")]) == ["a", "b"]
    (tmp_path / "plain").mkdir()
    expect_error(r"plain is a folder but not a datasets save_to_disk folder", plan_parts, "parquet",
                 [str(tmp_path / "plain")])
    expect_error(r"has no column 'body' \(columns: text\)", read_all, "parquet", [str(tmp_path / "dd" / "test")],
                 field="body")


def test_damaged_compressed_files_are_input_errors_even_with_on_bad(tmp_path):
    data = jsonl_bytes(DOCS * 20)
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(data)[:-100])
    expect_error(rf"^{truncated} cannot be read", read_all, "jsonl", [str(truncated)], on_bad=lambda m: None)
    flipped = bytearray(gzip.compress(data))
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "f.jsonl.gz").write_bytes(bytes(flipped))
    expect_error(r"f.jsonl.gz cannot be read", read_all, "jsonl", [str(tmp_path / "f.jsonl.gz")],
                 on_bad=lambda m: None)
    (tmp_path / "t.jsonl.zst").write_bytes(zstd(data)[:-100])  # zstandard's own reader would just stop here
    expect_error(r"t.jsonl.zst cannot be read .*ends in the middle of a frame", read_all, "jsonl",
                 [str(tmp_path / "t.jsonl.zst")], on_bad=lambda m: None)
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"some text")[:-3])
    expect_error(r"t.txt.gz cannot be read", read_all, "text", [str(tmp_path / "t.txt.gz")], on_bad=lambda m: None)
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    pytest.importorskip("pyarrow")
    expect_error(r"x.parquet is not a Parquet file", plan_parts, "parquet", [str(tmp_path / "x.parquet")])
    assert pathlib.Path(truncated).exists()
