"""Experiment configs: load a `get_config()` file, apply `key=value` overrides, validate into frozen dataclasses.

A config file returns an `ml_collections.ConfigDict` (the big_vision convention). It is read once, turned
into plain Python, overridden from the command line (MaxText style: positional dotted `key=value` after the
config path), then validated into the frozen dataclasses below. Nothing reads the raw ConfigDict after that,
so a misspelt key can never silently fall back to a default: unknown keys are errors with a suggestion.

Every dataclass documents its fields where they are defined and checks them in `check()`, next to the
fields. Errors are `ConfigError`s naming the field path, the bad value and the fix; the CLI prints them as
one line and exits 2.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

Mixture = tuple[tuple[str, float], ...]  # normalised (domain, weight) pairs, in declaration order

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEDULE_KINDS = ("constant", "linear", "cosine", "inverse_sqrt", "wsd", "infinite", "power")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
DEFAULT_SHAPE = {"wsd": "1-sqrt", "infinite": "cosine"}  # a schedule's `shape` when the config leaves it out


class ConfigError(ValueError):
    """A bad config value: `path = value: problem; fix`."""

    def __init__(self, path: str, value: Any, problem: str, fix: str = ""):
        # Kept apart so a caller can re-raise under the name the user typed (see cli.cmd_schedule).
        self.path, self.value, self.problem, self.fix = path, value, problem, fix
        msg = f"{path} = {value!r}: {problem}" if path else problem
        super().__init__(msg + (f"; {fix}" if fix else ""))


# ----------------------------------------------------------------------------------------------------------
# Small parsers shared by the field groups.
# ----------------------------------------------------------------------------------------------------------
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(value: Any, path: str) -> int:
    """An integer count written as 5000, 5e6, "20M" or "1.5B"."""
    if isinstance(value, bool):
        raise ConfigError(path, value, "expected a count", 'write e.g. 5000 or "20M"')
    if isinstance(value, (int, float)):
        if value != int(value) or value < 0:
            raise ConfigError(path, value, "expected a whole non-negative count", 'write e.g. 5000 or "20M"')
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", value.upper())
        if m:
            return int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))
    raise ConfigError(path, value, "not a count", 'write e.g. 5000, "20M" or "1.5B"')


def normalise_mixture(raw: Any, path: str) -> Mixture:
    """Weights -> normalised (domain, weight) pairs; negative or all-zero weights are errors."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(path, raw, "a mixture is a non-empty dict of domain weights",
                          'write e.g. {"prose": 0.7, "code": 0.3}')
    weights = {}
    for name, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"{path}.{name}", w, "a weight must be a number", "use e.g. 0.5")
        if w < 0:
            raise ConfigError(f"{path}.{name}", w, "weights cannot be negative", "use a weight >= 0")
        weights[str(name)] = float(w)
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(path, raw, "weights sum to 0", "give at least one domain a positive weight")
    return tuple((k, v / total) for k, v in weights.items())


def _did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    if not options:  # "valid keys: " followed by nothing helps nobody
        return "none are declared yet"
    close = difflib.get_close_matches(name, options, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(options))}"


def check_init_from(value: str, path: str) -> None:
    """`ckpt:WORKDIR[@STEP]` or `hf:DIR`; a bare folder gets the prefixed spelling as its fix.

    Shared by `model.init_from` and `clt train --init-from`, which must reject the same values."""
    kind, sep, rest = value.partition(":")
    if not value or (sep and kind in ("ckpt", "hf") and rest):
        return
    if sep and kind in ("ckpt", "hf"):
        raise ConfigError(path, value, "names no folder", f"write {kind}:DIR")
    raise ConfigError(path, value, "not a weights source: it needs the ckpt: prefix (or hf:)",
                      f"write ckpt:{value} for the latest checkpoint of the clt run in {value}, "
                      f"ckpt:{value}@STEP for one of its steps")


# ----------------------------------------------------------------------------------------------------------
# Field groups. Each is a frozen dataclass whose `check(path)` validates its own fields.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduleConfig:
    """One LR segment; see DESIGN.md "LR schedules" for the formulas. Resolved to steps in plan.py."""

    kind: str = "cosine"
    """constant | linear | cosine | inverse_sqrt | wsd | infinite | power."""
    warmup: float = 0
    """Warmup steps, or a fraction of the segment when < 1. In a later phase this is the re-warm."""
    peak: float = 3e-4
    """Peak LR (eta_max)."""
    end: float = 0.0
    """Final LR (eta_min) that decays approach; must not exceed `peak`."""
    decay: float = 0.2
    """wsd/power: fraction of the segment spent decaying at the end (10-20% is the published sweet spot)."""
    shape: str = ""
    """wsd decay shape: linear | cosine | 1-sqrt (default). infinite cooldown: cosine (default) | inverse_sqrt."""
    const: float = 0.0
    """infinite: the constant LR held after the cooldown (eta_const)."""
    cooldown: float = 0
    """infinite: cooldown steps from peak to `const`, or a fraction of its phase when < 1."""
    anneal: float = 0
    """infinite: anneal over this phase's last steps (steps, or fraction of the phase when < 1); 0 = none."""
    anneal_shape: str = "exponential"
    """infinite anneal: exponential | linear."""
    branch: bool = False
    """infinite: the anneal is a branch; the next phase continues from the state before it."""
    alpha: float = 1.0
    """infinite inverse_sqrt cooldown steepness (h(x) = 1/sqrt(1 + alpha x) - 1)."""
    a: float = 4.0
    """power: coefficient a in eta = batch * a * tokens**b."""
    b: float = -0.51
    """power: exponent b."""

    def check(self, path: str) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"{path}.kind", self.kind, "unknown schedule kind",
                              f"use one of {', '.join(SCHEDULE_KINDS)} or a preset name from schedules/")
        for name in ("warmup", "peak", "end", "decay", "const", "cooldown", "anneal", "alpha", "a"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be >= 0", "use a value >= 0")
        if self.kind == "power":
            if self.end > self.peak:
                raise ConfigError(f"{path}.end", self.end, f"end LR is above the peak cap {self.peak}",
                                  "lower `end` or raise `peak`")
        elif self.end > self.peak:
            raise ConfigError(f"{path}.end", self.end, f"end LR is above the peak {self.peak}",
                              "lower `end` or raise `peak`")
        if self.kind in ("wsd", "power") and not 0 <= self.decay <= 1:
            raise ConfigError(f"{path}.decay", self.decay, "decay is a fraction of the segment",
                              "use a value in [0, 1], e.g. 0.2")
        if self.kind == "wsd" and self.shape not in WSD_SHAPES + ("",):
            raise ConfigError(f"{path}.shape", self.shape, "unknown WSD decay shape", f"use one of {WSD_SHAPES}")
        if self.kind == "infinite":
            if self.shape not in ("cosine", "inverse_sqrt", ""):
                raise ConfigError(f"{path}.shape", self.shape, "unknown infinite cooldown shape",
                                  "use cosine or inverse_sqrt")
            if self.anneal_shape not in ("exponential", "linear"):
                raise ConfigError(f"{path}.anneal_shape", self.anneal_shape, "unknown anneal shape",
                                  "use exponential or linear")
            if not self.end <= self.const <= self.peak:
                raise ConfigError(f"{path}.const", self.const, f"need end ({self.end}) <= const <= peak "
                                  f"({self.peak})", "set const between end and peak")
            if self.anneal_shape == "exponential" and self.anneal and (self.end <= 0 or self.const <= 0):
                raise ConfigError(f"{path}.end", self.end, "an exponential anneal needs end > 0 and const > 0",
                                  "set end > 0 or use anneal_shape='linear'")
            if self.branch and not self.anneal:
                raise ConfigError(f"{path}.branch", self.branch, "a branch needs an anneal", "set anneal > 0")


@dataclass(frozen=True)
class UpsampleConfig:
    """Domain upsampling in the last fraction of a phase ("Does your data spark joy?")."""

    last: float = 0.1
    """Fraction of the phase (when < 1) or number of steps, at its end, that use `mixture`."""
    mixture: Mixture = ()
    """Weights used during the upsampling window."""

    def check(self, path: str) -> None:
        if self.last <= 0:
            raise ConfigError(f"{path}.last", self.last, "the upsampling window must be positive",
                              "use a fraction like 0.1 or a step count")


@dataclass(frozen=True)
class ReplayConfig:
    """Share of every batch drawn from earlier phases' data (or the replay buffer)."""

    share: float = 0.0
    """Fraction r of each block of rows that is replayed, in [0, 1)."""
    source: str = "mixture"
    """mixture: earlier phases' domains (old data still kept). buffer: the persistent replay buffer."""
    weights: Mixture = ()
    """Explicit replay weights over domains; empty = pro rata to the rows earlier phases trained on."""

    def check(self, path: str) -> None:
        if not 0 <= self.share < 1:
            raise ConfigError(f"{path}.share", self.share, "replay share must be in [0, 1)",
                              "use e.g. 0.05 (weak shift) or 0.25 (strong shift)")
        if self.source not in ("mixture", "buffer"):
            raise ConfigError(f"{path}.source", self.source, "unknown replay source", "use mixture or buffer")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: its data, duration, LR segment and optimizer policy."""

    name: str = ""
    """Unique name; overrides address a phase by it (phases.shift.replay=0.25)."""
    steps: int | None = None
    """Duration in optimizer steps. Exactly one of steps / tokens / percent."""
    tokens: int | None = None
    """Duration in tokens ("20M"); becomes ceil(tokens / (batch x seq_len)) steps."""
    percent: float | None = None
    """Duration as a percent of `budget`."""
    batch_size: int | None = None
    """Global batch (sequences) for this phase; None = the top-level batch_size (a ramp sets it per phase)."""
    mixture: Mixture = ()
    """Domain weights of fresh data in this phase."""
    schedule: ScheduleConfig = ScheduleConfig()
    """LR segment that starts at the phase's first step (a warmup here is a re-warm)."""
    optimizer: str = "keep"
    """keep: carry Adam moments across the switch. reset: fresh optimizer state at the phase start."""
    replay: ReplayConfig = ReplayConfig()
    """Replay of earlier data; a number is shorthand for the share."""
    upsample: UpsampleConfig | None = None
    """Upsampling window at the end of the phase."""
    blend_steps: int = 0
    """Linear cross-fade from the previous phase's mixture over this many steps at the switch."""

    def check(self, path: str) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.name):
            raise ConfigError(f"{path}.name", self.name, "a phase needs a name of letters, digits, _ or -",
                              'add name="base"')
        given = [k for k in ("steps", "tokens", "percent") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(path, {k: getattr(self, k) for k in given},
                              f"a phase needs exactly one of steps / tokens / percent, got {len(given)}",
                              "give one duration field")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"{path}.steps", self.steps, "must be positive", "use steps >= 1")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError(f"{path}.tokens", self.tokens, "must be positive", 'use e.g. "5M"')
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ConfigError(f"{path}.percent", self.percent, "must be in (0, 100]", "use e.g. 20")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"{path}.batch_size", self.batch_size, "must be positive", "use e.g. 32")
        if self.optimizer not in ("keep", "reset"):
            raise ConfigError(f"{path}.optimizer", self.optimizer, "unknown optimizer policy", "use keep or reset")
        if self.blend_steps < 0:
            raise ConfigError(f"{path}.blend_steps", self.blend_steps, "must be >= 0", "use 0 for a hard switch")
        self.schedule.check(f"{path}.schedule")
        self.replay.check(f"{path}.replay")
        if self.upsample is not None:
            self.upsample.check(f"{path}.upsample")


@dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder. `preset` fills the shape; explicit fields override it (see model.PRESETS)."""

    preset: str = "tiny"
    """tiny | demo | 125m | 1b | 7b | 8b, or "" to give every dimension explicitly."""
    vocab_size: int = 0
    """0 = the data's tokenizer vocabulary (read at train time)."""
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    """Grouped-query attention: n_heads must be a multiple of n_kv_heads."""
    d_ff: int = 0
    rope_theta: float = 0.0
    tie_embeddings: bool | None = None
    norm_eps: float = 1e-5
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16."""
    param_dtype: str = "float32"
    remat: str = "none"
    """Activation checkpointing per layer: none | full | dots (save matmul outputs only)."""
    doc_mask: bool = False
    """Mask attention at document boundaries (EOS) inside packed sequences."""
    init_from: str = ""
    """Start from these weights: "ckpt:WORKDIR[@STEP]" (a clt run) or "hf:DIR"; fresh optimizer, step 0."""

    def check(self, path: str) -> None:
        for name in ("dtype", "param_dtype"):
            allowed = ("auto", "float32", "bfloat16") if name == "dtype" else ("float32", "bfloat16")
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "unknown dtype", f"use one of {allowed}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"{path}.remat", self.remat, "unknown remat policy", "use none, full or dots")
        check_init_from(self.init_from, f"{path}.init_from")


@dataclass(frozen=True)
class DataConfig:
    """Prepared token shards per domain (see `clt prepare`)."""

    domains: tuple[tuple[str, str], ...] = ()
    """Domain name -> folder written by `clt prepare` (holding train/ and eval/)."""
    seq_len: int = 256
    """Tokens per training sequence (each row reads seq_len + 1 tokens)."""
    block_rows: int = 1024
    """K: rows per mixture block; every block holds exact largest-remainder domain counts."""
    eval_sequences: int = 32
    """Held-out sequences per domain in each evaluation."""
    eval_batch: int = 16
    """Sequences per eval forward pass (a multiple of the batch-sharding devices)."""
    prefetch: int = 4
    """Batches prepared ahead of the step by the loader threads."""

    def check(self, path: str) -> None:
        if not self.domains:
            raise ConfigError(f"{path}.domains", {}, "no domains declared",
                              'add data.domains={"prose": "data/demo/prose"}')
        for name, where in self.domains:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
                raise ConfigError(f"{path}.domains", name, "a domain name is letters, digits, _ or -",
                                  "rename the domain")
            if name == "replay":
                raise ConfigError(f"{path}.domains", name, "'replay' is reserved for replayed rows",
                                  "rename the domain")
        for name in ("seq_len", "block_rows", "eval_sequences", "eval_batch", "prefetch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be positive", "use a value >= 1")


@dataclass(frozen=True)
class BudgetConfig:
    """Total run length that `percent` durations refer to."""

    steps: int | None = None
    tokens: int | None = None

    def check(self, path: str) -> None:
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError(path, {"steps": self.steps, "tokens": self.tokens},
                              "a budget is exactly one of steps or tokens", 'write budget=dict(tokens="1B")')


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay and global-norm clipping; the LR comes from the plan."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (log Z)^2 that keeps logits from drifting; 0 = off."""
    grad_accum: int = 1
    """Micro-batches per step; the batch's rows are the same, only memory changes."""
    spike_factor: float = 0.0
    """Skip an update whose loss exceeds this factor times the running mean; 0 = only non-finite losses."""
    max_skips: int = 5
    """Consecutive skipped updates that stop the run (with a checkpoint of the last good state)."""

    def check(self, path: str) -> None:
        if self.grad_accum < 1:
            raise ConfigError(f"{path}.grad_accum", self.grad_accum, "must be >= 1", "use 1 for no accumulation")
        if self.spike_factor and self.spike_factor <= 1:
            raise ConfigError(f"{path}.spike_factor", self.spike_factor, "must be > 1 (or 0 = off)", "use e.g. 3.0")
        for name in ("weight_decay", "clip", "z_loss", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be >= 0", "use a value >= 0")


@dataclass(frozen=True)
class MonitorConfig:
    """Evaluation cadence and stability-gap metrics (DESIGN.md "Monitoring")."""

    every: int = 100
    """Sparse eval interval in steps."""
    dense_every: int = 10
    """Eval interval inside the window after a switch."""
    dense_window: int = 300
    """Steps after each switch evaluated densely (clipped at the next switch)."""
    recovery_tol: float = 0.02
    """A domain has recovered when its loss is back within this of the baseline."""
    gap_alert: float = 0.0
    """Alert when a gap exceeds this (nats); 0 = off."""
    forgetting_alert: float = 0.0
    """Alert when an old domain's loss at a phase end exceeds its baseline by this; 0 = off."""
    recovery_deadline: int = 0
    """Alert when a domain has not recovered this many steps after a switch; 0 = off."""
    on_alert: str = "log"
    """log: record the alert. stop: save a checkpoint and stop the run."""
    tasks: tuple[str, ...] = ()
    """Extra eval tasks: JSONL files of multiple-choice items (see evaluate.py)."""

    def check(self, path: str) -> None:
        for name in ("every", "dense_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be positive", "use e.g. 100")
        if self.dense_window < 0:
            raise ConfigError(f"{path}.dense_window", self.dense_window, "must be >= 0", "use 0 for no dense eval")
        if self.on_alert not in ("log", "stop"):
            raise ConfigError(f"{path}.on_alert", self.on_alert, "unknown alert action", "use log or stop")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in <workdir>/checkpoints; phase ends are always saved and kept."""

    every: int = 0
    """Save every N steps; 0 = only at phase ends, preemption and the end."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save; 0 = off."""
    keep: int = 3
    """Interval checkpoints kept (phase ends are kept regardless)."""
    async_save: bool = True
    """Write in the background while training continues."""

    def check(self, path: str) -> None:
        if self.every < 0 or self.every_minutes < 0:
            raise ConfigError(path, (self.every, self.every_minutes), "intervals must be >= 0", "use 0 for off")
        if self.keep < 1:
            raise ConfigError(f"{path}.keep", self.keep, "must keep at least one checkpoint", "use keep >= 1")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 = all remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def check(self, path: str) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(path, dict(data=self.data, fsdp=self.fsdp, tensor=self.tensor),
                              "axis sizes are positive, with at most one -1", "e.g. mesh.data=-1 mesh.fsdp=2")


@dataclass(frozen=True)
class ReplayBufferConfig:
    """Persistent replay buffer: a reservoir over trained sequences (replay.py)."""

    capacity: int = 0
    """Sequences kept; 0 = no buffer."""
    load: str = ""
    """An exported buffer (`clt replay export`) used as the replay source of this run."""

    def check(self, path: str) -> None:
        if self.capacity < 0:
            raise ConfigError(f"{path}.capacity", self.capacity, "must be >= 0", "use 0 for no buffer")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    """Steps between log lines (the only host synchronisation in the loop)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <workdir>/tb (needs the tensorboardX package)."""

    def check(self, path: str) -> None:
        if self.every <= 0:
            raise ConfigError(f"{path}.every", self.every, "must be positive", "use e.g. 10")


@dataclass(frozen=True)
class DebugConfig:
    preempt_at_step: int = -1
    """Send this process SIGTERM after this step (tests preemption without timing); -1 = off."""
    kill_at_step: int = -1
    """SIGKILL this process after this step's update, before its checkpoint (fault tests); -1 = off."""
    kill_in_save: bool = False
    """With kill_at_step: SIGKILL right after that step's checkpoint save has started, before it completes."""

    def check(self, path: str) -> None:
        pass


@dataclass(frozen=True)
class Config:
    """A whole experiment, validated and frozen."""

    phases: tuple[PhaseConfig, ...] = ()
    """Ordered training phases."""
    data: DataConfig = DataConfig()
    batch_size: int = 32
    """Global batch in sequences (a phase may override it)."""
    seed: int = 0
    """Everything random (init, data order, replay) derives from it."""
    budget: BudgetConfig | None = None
    """Total length that `percent` phase durations refer to."""
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    monitor: MonitorConfig = MonitorConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    replay_buffer: ReplayBufferConfig = ReplayBufferConfig()
    log: LogConfig = LogConfig()
    debug: DebugConfig = DebugConfig()

    def check(self, path: str = "") -> None:
        if self.batch_size <= 0:
            raise ConfigError("batch_size", self.batch_size, "must be positive", "use e.g. 32")
        if not self.phases:
            raise ConfigError("phases", (), "no phases", "add at least one phase")
        self.data.check("data")  # before the phases: their mixtures name domains that must be declared
        domains = {d for d, _ in self.data.domains}
        names = set()
        for i, ph in enumerate(self.phases):
            p = f"phases.{ph.name or i}"
            ph.check(p)
            if ph.name in names:
                raise ConfigError(f"{p}.name", ph.name, "duplicate phase name", "give each phase its own name")
            names.add(ph.name)
            mixes = [("mixture", ph.mixture), ("replay.weights", ph.replay.weights)]
            if ph.upsample is not None:
                mixes.append(("upsample.mixture", ph.upsample.mixture))
            for where, mix in mixes:
                for d, _ in mix:
                    if d not in domains:
                        raise ConfigError(f"{p}.{where}.{d}", d, "domain is not declared in data.domains",
                                          _did_you_mean(d, domains))
            if not ph.mixture:
                raise ConfigError(f"{p}.mixture", {}, "a phase needs a mixture", 'add mixture={"prose": 1.0}')
            if ph.upsample is not None and not ph.upsample.mixture:
                raise ConfigError(f"{p}.upsample.mixture", {}, "upsampling needs a mixture",
                                  'add mixture={"code": 0.7, "prose": 0.3}')
            if ph.replay.share > 0 and ph.replay.source == "mixture" and i == 0 and not ph.replay.weights:
                raise ConfigError(f"{p}.replay", ph.replay.share, "the first phase has no earlier data to replay",
                                  "give replay.weights, use source='buffer' with replay_buffer.load, or set 0")
            if ph.replay.share > 0 and ph.replay.source == "buffer" and i == 0 and not self.replay_buffer.load:
                raise ConfigError(f"{p}.replay.source", "buffer", "the first phase has no buffer to replay from",
                                  "set replay_buffer.load to an exported buffer, or replay from a later phase")
            if ph.replay.share > 0 and ph.replay.source == "buffer" and not (
                    self.replay_buffer.capacity or self.replay_buffer.load):
                raise ConfigError(f"{p}.replay.source", "buffer", "no replay buffer is configured",
                                  "set replay_buffer.capacity (or replay_buffer.load)")
            if ph.percent is not None and self.budget is None:
                raise ConfigError(f"{p}.percent", ph.percent, "percent needs a budget",
                                  'add budget=dict(steps=10000) or budget=dict(tokens="1B")')
        total_pct = sum(ph.percent or 0 for ph in self.phases)
        if total_pct > 100 + 1e-9:
            raise ConfigError("phases", total_pct, "percent durations exceed 100% of the budget",
                              "lower the phases' percent values")
        if self.budget is not None:
            self.budget.check("budget")
        for group in ("model", "optim", "monitor", "checkpoint", "mesh", "replay_buffer", "log", "debug"):
            getattr(self, group).check(group)

    def domain_names(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.data.domains)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (mixtures and domains back as dicts)."""
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name in ("mixture", "weights", "domains"):
                out[f.name] = dict(v)
            else:
                out[f.name] = _to_plain(v)
        return out
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with types checked and unknown keys rejected.
# ----------------------------------------------------------------------------------------------------------
def preset_names(kind: str) -> list[str]:
    """The presets of `kind` ("schedules" or "replay"): one file each in that folder of the repository."""
    return sorted(p.stem for p in (REPO_ROOT / kind).glob("*.py"))


def _resolve_preset(kind: str, name: str, path: str) -> dict:
    """Load `schedules/NAME.py` or `replay/NAME.py` (a get_config() returning a dict)."""
    file = REPO_ROOT / kind / f"{name}.py"
    if not file.exists():
        names = preset_names(kind)
        raise ConfigError(path, name, f"unknown {kind[:-1] if kind.endswith('s') else kind} preset",
                          f"{_did_you_mean(name, names)} (presets live in {kind}/)")
    return dict(_load_module(file, path).get_config())


def _load_module(file: pathlib.Path, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"clt_cfg_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's error, shown in one line
        raise ConfigError(path, str(file), f"cannot load: {type(e).__name__}: {e}", "fix the file") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(path, str(file), "has no get_config()", "define get_config() returning the config")
    return module


def _schedule_dict(raw: Any, path: str) -> dict:
    if isinstance(raw, str):
        return _resolve_preset("schedules", raw, path)
    if isinstance(raw, dict) and "preset" in raw:
        base = _resolve_preset("schedules", raw["preset"], f"{path}.preset")
        return {**base, **{k: v for k, v in raw.items() if k != "preset"}}
    return raw


def _replay_dict(raw: Any, path: str) -> Any:
    if isinstance(raw, bool):
        raise ConfigError(path, raw, "replay is a share, a preset name or a dict", "write e.g. replay=0.25")
    if isinstance(raw, (int, float)):
        return {"share": raw}
    if isinstance(raw, str):
        return _resolve_preset("replay", raw, path)
    if isinstance(raw, dict) and "preset" in raw:
        base = _resolve_preset("replay", raw["preset"], f"{path}.preset")
        return {**base, **{k: v for k, v in raw.items() if k != "preset"}}
    return raw


_PRE = {  # field-specific conversions applied before generic typing
    (PhaseConfig, "schedule"): _schedule_dict,
    (PhaseConfig, "replay"): _replay_dict,
    (PhaseConfig, "tokens"): lambda v, p: None if v is None else parse_count(v, p),
    (PhaseConfig, "mixture"): normalise_mixture,
    (UpsampleConfig, "mixture"): normalise_mixture,
    (ReplayConfig, "weights"): lambda v, p: () if not v else normalise_mixture(v, p),
    (BudgetConfig, "tokens"): lambda v, p: None if v is None else parse_count(v, p),
    (BudgetConfig, "steps"): lambda v, p: None if v is None else parse_count(v, p),
    (DataConfig, "domains"): lambda v, p: _domains(v, p),
}


def _domains(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, "domains is a dict of name -> prepared folder",
                          'write {"prose": "data/demo/prose"}')
    return tuple((str(k), str(v)) for k, v in raw.items())


def build(cls: type, raw: Any, path: str) -> Any:
    """Plain dict -> dataclass `cls`, recursively; unknown keys and wrong types are ConfigErrors."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(path, raw, f"expected a dict for {cls.__name__}", "see the README's config section")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(sub, value, "unknown field", _did_you_mean(key, names))
        pre = _PRE.get((cls, key))
        if pre is not None:
            value = pre(value, sub)
        kwargs[key] = _convert(hints[key], value, sub)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "expected True or False", "write True or False")
        return value
    if tp is int:
        if isinstance(value, float) and value == int(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "expected an integer", "write a whole number")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "expected a number", "write e.g. 0.1")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "expected a string", "quote the value")
        return value
    if origin is tuple:
        if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value):
            return value  # already-normalised pairs (mixtures, domains)
        if isinstance(value, (list, tuple)):
            elem = args[0]
            return tuple(_convert(elem, v, f"{path}.{i}") for i, v in enumerate(value))
        raise ConfigError(path, value, "expected a tuple", "write (a, b, ...)")
    return value


# ----------------------------------------------------------------------------------------------------------
# Loading and overrides.
# ----------------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """ConfigDict / FrozenConfigDict / lists -> plain dicts and tuples."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return tuple(_plain(v) for v in obj)
    return obj


def parse_value(text: str) -> Any:
    """Command-line value: a Python literal when it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides to a plain config dict; phases addressable by name or index."""
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, item, "an override is key=value", "write e.g. batch_size=16")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError(key, text, f"overridden twice (already {seen[key]!r})", "give each key once")
        seen[key] = text
        _set_path(raw, key.split("."), parse_value(text), key)
    return raw


_FREE_DICTS = {"mixture", "weights", "domains"}  # user-keyed dicts: new keys are allowed


def _set_path(node: Any, parts: list[str], value: Any, full: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, tuple):
        raise ConfigError(full, value, "internal: tuple node", "")
    if head == "phases" and rest:
        phases = list(node.get("phases", ()))
        sel = rest[0]
        idx = next((i for i, p in enumerate(phases) if p.get("name") == sel), None)
        if idx is None and sel.lstrip("-").isdigit() and -len(phases) <= int(sel) < len(phases):
            idx = int(sel) % len(phases)
        if idx is None:
            names = [p.get("name", str(i)) for i, p in enumerate(phases)]
            raise ConfigError(full, value, f"no phase {sel!r}", f"phases are {names} (or an index)")
        if len(rest) == 1:
            phases[idx] = value
        else:
            phase = dict(phases[idx])
            _set_path(phase, rest[1:], value, full)
            phases[idx] = phase
        node["phases"] = tuple(phases)
        return
    if not rest:
        node[head] = value
        return
    child = node.get(head)
    if child is None:
        child = {}
    elif isinstance(child, str) and head in ("schedule", "replay"):
        child = {"preset": child}  # override a field of a preset by name
    elif isinstance(child, (int, float)) and head == "replay":
        child = {"share": child}
    if not isinstance(child, dict):
        raise ConfigError(full, value, f"{head!r} is not a group of fields", f"set {head}=... directly")
    child = dict(child)
    _set_path(child, rest, value, full)
    node[head] = child


def load_raw(path: str) -> dict:
    """The config file's get_config() as plain data; a path that is not a Python file is a ConfigError."""
    file = pathlib.Path(path)
    example = "give the path of a get_config() file, e.g. configs/demo.py"
    if not file.exists():
        raise ConfigError("config", path, "no such file", example)
    if file.is_dir():
        inside = sorted(str(p) for p in file.glob("*.py"))[:3]
        raise ConfigError("config", path, "is a folder, not a config file",
                          f"give one of the files in it, e.g. {', '.join(inside)}" if inside else example)
    if file.suffix != ".py":
        raise ConfigError("config", path, "is not a Python (.py) file", example)
    return _plain(_load_module(file, "config").get_config())


def load(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load, override and validate a config file; raises ConfigError."""
    return from_dict(apply_overrides(load_raw(path), overrides))


def from_dict(raw: dict) -> Config:
    cfg = build(Config, raw, "")
    cfg.check()
    return cfg
