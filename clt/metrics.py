"""Where a run's numbers go: `metrics.jsonl` / `events.jsonl` (the source of truth), TensorBoard, the console
line of each log interval, and the throughput and MFU those lines report.

Every logged or evaluated value is one JSON object with its `step` and `phase`; switches, alerts, resumes and
checkpoints are events. Lines are flushed as written, so a crash loses at most the line being written, and
readers skip a torn last line. TensorBoard and Weights & Biases are optional extra sinks.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import pathlib
import time
import uuid
from typing import Any, Callable, Iterator

from clt.config import ConfigError, WandbConfig

log = logging.getLogger("clt")


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
            importlib.import_module("tensorboardX")
        except ImportError as e:
            raise ConfigError("log.tensorboard", True, f"needs the tensorboardX package, which does not import ({e})",
                              "pip install tensorboardX (or set log.tensorboard=False)") from None

    def write(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._writer.close()


WANDB_ID_FILE = "wandb/clt-run-id"
"""Workdir-relative file holding the id of the workdir's W&B run: every `clt train` of the workdir continues it."""


def wandb_run_id(workdir: str | pathlib.Path) -> str:
    """The W&B run id of `workdir`, made (and kept in WANDB_ID_FILE) by its first run with W&B on. A copied
    workdir continues the same W&B run: delete the file to start a new one."""
    path = pathlib.Path(workdir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:16]
    write_atomic(path, run_id + "\n")
    return run_id


class WandbSink:
    """A run's metrics rows and events to Weights & Biases (`log.wandb`; needs `pip install 'clt[wandb]'`).

    One W&B run per workdir: its id lives in <workdir>/wandb/clt-run-id and `wandb.init(resume="allow")`
    continues it, so the invocations of a preempted and resumed run land in one W&B run. The resolved config
    (with the plan under `plan`) is the run's config; plan.json, events.jsonl and metrics.jsonl are its files.

    Steps: W&B's own `_step` is a row counter that may only increase, while clt's rows are keyed by the
    training step: an eval row and a train row share a step, a phase end has a train row, an eval row and a
    release row at one step, and a resumed run logs again the steps after its checkpoint. So each row is one
    `wandb.log` call without `step=` (W&B counts `_step` itself, continuing it on an online resume) and the
    row's own `step` is a metric that `define_metric` makes the x-axis of every other one: charts are over
    training steps, nothing is dropped for going back, and a step logged again is drawn over its first values
    (the same unless a setting changed at the resume). metrics.jsonl, one row per step, stays the reference.

    Events are rows too: `event/<name>` = 1 at the event's step (markers on the same x-axis) and `event`, the
    events.jsonl line as JSON text. An `alert` is also a W&B alert (W&B can mail or Slack it), `preempted`
    marks the run as preempting, and `stopped` finishes it with exit code 1.

    W&B never stops training: a failing call (init, log, finish) is a warning in the log and the run goes on.
    """

    MAX_WARNINGS = 5
    """Failed W&B calls reported one by one; later ones are counted and reported at `close`."""

    def __init__(self, workdir: str | pathlib.Path, cfg: WandbConfig, config: dict):
        self.require(cfg.project)
        import wandb

        wd = pathlib.Path(workdir)
        self.exit_code, self.failures, self.run = 0, 0, None
        self._wandb = wandb
        directory = pathlib.Path(cfg.dir) if cfg.dir else wd
        directory.mkdir(parents=True, exist_ok=True)
        mode = cfg.mode or os.environ.get("WANDB_MODE") or None  # read here: W&B reads it once per process
        self.run = self._call("init", lambda: wandb.init(
            project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
            name=cfg.name or wd.resolve().name, tags=list(cfg.tags), mode=mode, dir=str(directory), config=config,
            id=wandb_run_id(wd), resume="allow", reinit="finish_previous"))
        if self.run is None:
            return
        self._call("define_metric", lambda: (self.run.define_metric("step"),
                                             self.run.define_metric("*", step_metric="step")))
        for name, policy in (("plan.json", "now"), ("events.jsonl", "live"), ("metrics.jsonl", "end")):
            if (wd / name).exists():
                self._call("save", lambda: self.run.save(str(wd / name), base_path=str(wd), policy=policy))

    @staticmethod
    def require(project: str) -> None:
        """A ConfigError naming `log.wandb.project` when wandb is missing: `clt train` calls it before any
        heavy work, so the run does not fail after compiling."""
        try:
            importlib.import_module("wandb")
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (a protobuf mismatch)
            raise ConfigError("log.wandb.project", project, f"needs the wandb package, which does not import ({e})",
                              "pip install 'clt[wandb]' (or set log.wandb.project='' for no W&B)") from None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, or None and a warning when it raises: W&B is never a reason for a run to fail."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self.failures += 1
            if self.failures <= self.MAX_WARNINGS:
                more = "; later failures are counted, not shown" if self.failures == self.MAX_WARNINGS else ""
                log.warning("W&B %s failed (%s: %s); training continues, metrics.jsonl has every row%s", what,
                            type(e).__name__, e, more)
            return None

    def write(self, row: dict) -> None:
        if self.run is not None:
            self._call("log", lambda: self.run.log(dict(row)))

    def event(self, event: dict) -> None:
        if self.run is None:
            return
        name = str(event.get("event", "event"))
        line = json.dumps({k: _clean(v) for k, v in event.items()})
        self._call("log", lambda: self.run.log({"step": event.get("step", 0), f"event/{name}": 1, "event": line}))
        if name == "alert":
            self._call("alert", lambda: self.run.alert(title=f"clt {event.get('alert', 'alert')} alert",
                                                       text=str(event.get("message", line)),
                                                       level=self._wandb.AlertLevel.WARN))
        elif name == "preempted":
            self._call("mark_preempting", self.run.mark_preempting)
        elif name == "stopped":
            self.exit_code = 1

    def close(self, exit_code: int | None = None) -> None:
        """Finish the W&B run (exit code 1 after a `stopped` event or when given); a second call does nothing."""
        run, self.run = self.run, None
        if run is not None:
            code = self.exit_code if exit_code is None else exit_code
            self._call("finish", lambda: run.finish(exit_code=code))
        if self.failures > self.MAX_WARNINGS:
            log.warning("W&B: %d calls failed in all", self.failures)
            self.failures = 0


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
