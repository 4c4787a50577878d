"""`metrics.jsonl` and `events.jsonl`: append-only JSON lines, the source of truth of a run.

Every logged or evaluated value is one JSON object with its `step` and `phase`; switches, alerts, resumes and
checkpoints are events. Lines are flushed as written, so a crash loses at most the line being written, and
readers skip a torn last line. TensorBoard is an optional extra sink.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Iterator

from clt.config import ConfigError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class JsonlWriter:
    """Appends one JSON object per line, each line whole or not at all: a write the disk refuses halfway is
    cut back off before the error propagates, so a full disk never leaves a torn line behind."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)

    def write(self, row: dict) -> None:
        data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode()
        start = self._file.seek(0, 2)
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
        except OSError:
            self._file.truncate(start)
            raise

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """All complete rows of a JSONL file (a torn last line from a crash is skipped)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | pathlib.Path) -> Iterator[dict]:
    p = pathlib.Path(path)
    if not p.exists():
        return
    with open(p) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def truncate_from(path: str | pathlib.Path, step: int, keep: Callable[[dict], bool] | None = None) -> None:
    """Drop rows with step >= `step` unless `keep(row)`: on resume from a checkpoint of `step` updates, the
    resumed run writes those rows again, so the file reads as one uninterrupted run."""
    p = pathlib.Path(path)
    if not p.exists():
        return
    rows = [r for r in iter_jsonl(p) if r.get("step", -1) < step or (keep is not None and keep(r))]
    write_atomic(p, "".join(json.dumps(r) + "\n" for r in rows))


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    """Replace a run file whole: written aside and renamed, so a kill or a full disk leaves the old file intact
    and no temporary file behind."""
    p = pathlib.Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)


class TensorBoardSink:
    """Scalars of every metrics row to <workdir>/tb (needs the optional tensorboardX package)."""

    def __init__(self, logdir: str | pathlib.Path):
        self.require()
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    @staticmethod
    def require() -> None:
        """A ConfigError naming `log.tensorboard` when tensorboardX is missing: `clt train` calls it before
        any heavy work, so the run does not fail after compiling."""
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ConfigError("log.tensorboard", True, f"needs the tensorboardX package, which does not import ({e})",
                              "pip install tensorboardX (or set log.tensorboard=False)") from None

    def write(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._writer.close()
