"""metrics.jsonl / events.jsonl: append-only rows, torn lines, resume truncation, the optional TensorBoard sink."""

import importlib.util

import pytest

from clt.config import ConfigError
from clt.metrics import JsonlWriter, TensorBoardSink, read_jsonl


def test_rows_round_trip_and_a_torn_last_line_is_skipped(tmp_path):
    w = JsonlWriter(tmp_path / "m.jsonl")
    w.write(dict(step=0, loss=1.5))
    w.write(dict(step=1, loss=float("nan")))  # JSON has no NaN: kept visible as a string
    w.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    assert read_jsonl(tmp_path / "m.jsonl") == [dict(step=0, loss=1.5), dict(step=1, loss="nan")]


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    sink = TensorBoardSink(tmp_path / "tb")
    sink.write(dict(step=3, loss=2.0, phase="base"))
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is not None, reason="tensorboardX is installed")
def test_tensorboard_sink_without_the_package_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match=r"log.tensorboard = True: needs the tensorboardX package.*; pip install "
                                          r"tensorboardX"):
        TensorBoardSink(tmp_path / "tb")
