"""Where a run's numbers go: `metrics.jsonl` / `events.jsonl` (the source of truth), TensorBoard, the console
line of each log interval, and the throughput and MFU those lines report.

Every logged or evaluated value is one JSON object with its `step` and `phase`; switches, alerts, resumes and
checkpoints are events. Lines are flushed as written, so a crash loses at most the line being written, and
readers skip a torn last line. TensorBoard is an optional extra sink.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
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
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    # NVIDIA, dense bf16 tensor-core peaks of the data sheets (sparsity doubles them; clt never counts that).
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),  # Grace Hopper: an H100/H200-class GPU
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    # Google TPUs, per chip (jax's device_kind).
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)
"""Dense bf16 peak FLOP/s per device: (device-kind substring, peak), first match wins, so the more specific
names come first. The one table MFU is computed from; devices not listed (CPU) get no MFU."""


def peak_flops(device_kind: str) -> float | None:
    """The peak FLOP/s of one device of `device_kind` (jax's `device.device_kind`), None when unknown."""
    return next((v for k, v in PEAK_FLOPS if k in device_kind), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the devices' peak."""
    return tokens_per_s * flops_per_token / (peak * n_devices)


TIMING_FIELDS = frozenset({"tokens_per_s", "step_s", "mfu"})
"""Metrics-row fields measured by the clock: the only ones two identical runs may disagree on."""


class StepClock:
    """Wall time of the train steps alone, per log interval and in total.

    The loop never waits for a step to log it: the metrics of step s are read after step s+1 is dispatched, so
    an interval ends when its last step's metrics arrive (`interval()`). Eval, checkpoint saves and the first
    step's compile run inside `aside(kind)`, whose time is subtracted from the interval and added to the
    kind's total, after the queued steps have finished (their time is training). tokens/s and MFU therefore
    describe the train step as it runs in steady state, with or without a busy eval schedule."""

    KINDS = ("compile", "eval", "checkpoint")

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now  # tests pass a fake clock
        self.totals = dict.fromkeys(("train", *self.KINDS), 0.0)
        self._start, self._aside, self.tokens, self.steps = now(), 0.0, 0, 0

    def add(self, tokens: int) -> None:
        """One train step of `tokens` dispatched in the current interval."""
        self.tokens, self.steps = self.tokens + tokens, self.steps + 1

    @contextlib.contextmanager
    def aside(self, kind: str, wait: Any = None) -> Iterator[None]:
        """Time the block as `kind`, not training; `wait` (arrays) is waited for first, as training time."""
        if wait is not None:
            import jax  # here: `clt status` reads run files through this module and must not import jax

            jax.block_until_ready(wait)
        t0 = self.now()
        try:
            yield
        finally:
            spent = self.now() - t0
            self._aside += spent
            self.totals[kind] += spent

    def cut(self) -> tuple[int, int]:
        """Close the interval's count of steps and tokens (its time closes at `interval()`); a new count starts."""
        counted = self.tokens, self.steps
        self.tokens, self.steps = 0, 0
        return counted

    def interval(self, tokens: int, steps: int) -> dict[str, float]:
        """tokens_per_s and step_s of the interval that ends now (when its last step's metrics arrived)."""
        now = self.now()
        train = max(now - self._start - self._aside, 1e-9)
        self._start, self._aside = now, 0.0
        self.totals["train"] += train
        return dict(tokens_per_s=tokens / train, step_s=train / max(steps, 1))

    def restart(self) -> None:
        """Start the interval now (after the compile), discarding time not yet accounted for."""
        self._start, self._aside = self.now(), 0.0

    def summary(self) -> dict[str, float]:
        """Seconds by kind for the run's end events: train, compile, eval, checkpoint."""
        return {f"{k}_s": round(v, 3) for k, v in self.totals.items()}


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
