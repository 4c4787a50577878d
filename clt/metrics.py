"""Where a run's numbers go: `metrics.jsonl` / `events.jsonl` (the source of truth), TensorBoard, the console
line of each log interval, and the throughput and MFU those lines report.

Every logged or evaluated value is one JSON object with its `step` and `phase`; switches, alerts, resumes and
checkpoints are events. Lines are flushed as written, so a crash loses at most the line being written, and
readers skip a torn last line. TensorBoard is an optional extra sink.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Iterator

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


# ----------------------------------------------------------------------------------------------------------
# Throughput and MFU; the console lines of the loop.
# ----------------------------------------------------------------------------------------------------------
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}
"""Dense bf16 peak FLOP/s per device by device-kind substring, for MFU; devices not listed (CPU) get none."""


def peak_flops(device_kind: str) -> float | None:
    """The peak FLOP/s of one device of `device_kind` (jax's `device.device_kind`), None when unknown."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak * n_devices)


class Throughput:
    """Tokens per second since the last `reset()` (each log interval; the compile is kept out of it)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self._t0, 1e-9)


def log_line(step: int, total: int, phase: str, row: dict) -> str:
    """The console line of a train row: step, phase, loss, LR, and throughput / MFU / skips when known."""
    s = f"step {step:>6}/{total} | {phase:<10} | loss {row['loss']:.4f} | lr {row['lr']:.2e}"
    if "tokens_per_s" in row:
        s += f" | {row['tokens_per_s'] / 1e3:.1f}k tok/s"
    if "mfu" in row:
        s += f" | MFU {row['mfu']:.1%}"
    if row.get("skipped_total"):
        s += f" | skipped updates {row['skipped_total']}"
    return s


def eval_line(row: dict, seconds: float) -> str:
    """The console line of an eval row: each domain's held-out loss."""
    losses = " · ".join(f"{k[5:-5]} {v:.3f}" for k, v in row.items() if k.startswith("eval/") and k.endswith("/loss"))
    return f"eval @ step {row['step']} ({row['phase']}, {seconds:.1f}s): {losses}"
