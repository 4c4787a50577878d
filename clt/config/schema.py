"""The config's field groups: frozen dataclasses, each documenting its fields and checking them in `check()`.

Errors are `ConfigError`s naming the field path, the bad value and the fix; the CLI prints them as one line
and exits 2. A phase's `schedule` is `clt.schedule.Schedule`, whose kinds and kind-specific checks live in
that module's registry; `check_schedule` turns its problems into ConfigErrors here. Building these classes
from plain data, presets and overrides is clt/config/load.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import typing
from dataclasses import dataclass
from typing import Any

from clt.schedule import KINDS, Schedule

Mixture = tuple[tuple[str, float], ...]  # normalised (domain, weight) pairs, in declaration order

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
"""The repository: its schedules/ and replay/ folders hold the presets."""


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


def did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    """The fix for a name that is not among `options`: the closest one, else the list of them."""
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
def check_schedule(s: Schedule, path: str) -> None:
    """A phase's schedule: a kind of the registry, then the checks of clt/schedule.py (shared, then the kind's)."""
    if s.kind not in KINDS:
        raise ConfigError(f"{path}.kind", s.kind, "unknown schedule kind",
                          f"use one of {', '.join(KINDS)} or a preset name from schedules/")
    found = s.problems()
    if found:
        field, problem, fix = found[0]
        raise ConfigError(f"{path}.{field}", getattr(s, field), problem, fix)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a field group that a config may set (plan.py sets those marked `plan_only`)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("plan_only")]


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
    schedule: Schedule = Schedule()
    """LR segment that starts at the phase's first step (a warmup here is a re-warm); see clt/schedule.py."""
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
        check_schedule(self.schedule, f"{path}.schedule")
        self.replay.check(f"{path}.replay")
        if self.upsample is not None:
            self.upsample.check(f"{path}.upsample")


ATTENTION_CHOICES = ("auto", "xla", "cudnn", "splash")
"""`model.attention` values; each but auto names a kernel of clt/attention.py."""


@dataclass(frozen=True)
class ModelConfig:
    """Llama-family decoder. `preset` fills the shape; explicit fields override it (see model.PRESETS)."""

    preset: str = "tiny"
    """tiny | demo | 125m | 1b | 7b | 8b, or "" to give every dimension explicitly. Not read when init_from
    names a source: the model's shape is then the source's."""
    vocab_size: int = 0
    """0 = the data's tokenizer vocabulary (read at train time). The embedding is padded to a multiple of 128
    rows; logits cover vocab_size ids."""
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    """Grouped-query attention: n_heads must be a multiple of n_kv_heads."""
    head_dim: int = 0
    """0 = d_model / n_heads (Qwen3 sets it apart from d_model)."""
    d_ff: int = 0
    rope_theta: float = 0.0
    tie_embeddings: bool | None = None
    norm_eps: float = 1e-5
    """RMSNorm's epsilon (HF rms_norm_eps)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over head_dim on queries and keys before RoPE (Qwen3)."""
    rope_scaling: str = "none"
    """none | llama3: Llama 3.1+ long-context RoPE scaling, set by the four rope_* numbers below."""
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    """HF original_max_position_embeddings: the context the unscaled model was trained at."""
    sliding_window: int = 0
    """Attend to at most this many most recent tokens, itself included (Mistral); 0 = full causal attention."""
    max_position_embeddings: int = 0
    """The context length written into an exported config.json; 0 = the run's data.seq_len."""
    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16."""
    param_dtype: str = "float32"
    remat: str = "none"
    """Activation checkpointing per layer: none | full | dots (save matmul outputs only)."""
    doc_mask: bool = False
    """Mask attention at document boundaries (EOS) inside packed sequences."""
    attention: str = "auto"
    """Attention kernel (clt/attention.py): auto (splash on TPU, cuDNN flash on GPU where the shape allows, XLA
    otherwise) | xla | cudnn | splash. Numerics only: a resume may change it."""
    init_from: str = ""
    """Start from these weights: "ckpt:WORKDIR[@STEP]" (a clt run) or "hf:DIR"; fresh optimizer, step 0."""

    def adopt(self, fields: dict[str, Any], source: str) -> "ModelConfig":
        """This config with a source model's architecture (`init_from`): the model is the source's. A field this
        config sets to another value than the source's is an error, never silently replaced."""
        unset = ModelConfig()
        for name, value in fields.items():
            mine = getattr(self, name)
            if name != "preset" and mine != getattr(unset, name) and mine != value:
                raise ConfigError(f"model.{name}", mine, f"init_from {source} has {name}={value!r}",
                                  f"remove model.{name}: the model's shape comes from init_from")
        return dataclasses.replace(self, **fields)

    def check(self, path: str) -> None:
        for name in ("dtype", "param_dtype"):
            allowed = ("auto", "float32", "bfloat16") if name == "dtype" else ("float32", "bfloat16")
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "unknown dtype", f"use one of {allowed}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"{path}.attention", self.attention, "unknown attention implementation",
                              f"use one of {ATTENTION_CHOICES}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"{path}.remat", self.remat, "unknown remat policy", "use none, full or dots")
        if self.rope_scaling not in ("none", "llama3"):
            raise ConfigError(f"{path}.rope_scaling", self.rope_scaling, "unknown RoPE scaling", "use none or llama3")
        if self.rope_scaling == "llama3" and not (self.rope_factor > 0 and self.rope_original_context > 0
                                                  and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError(f"{path}.rope_factor", self.rope_factor, "llama3 scaling needs factor > 0, "
                              "original_context > 0 and 0 < low_freq_factor < high_freq_factor",
                              "use Llama 3.1's 8.0, 8192, 1.0, 4.0")
        for name in ("head_dim", "sliding_window", "max_position_embeddings"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}", getattr(self, name), "must be 0 or positive", "0 = the default")
        if self.norm_eps <= 0:
            raise ConfigError(f"{path}.norm_eps", self.norm_eps, "must be positive", "e.g. 1e-5 or 1e-6")
        check_init_from(self.init_from, f"{path}.init_from")


ARCH_FIELDS = ("preset", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
               "rope_theta", "tie_embeddings", "norm_eps", "qkv_bias", "qk_norm", "rope_scaling", "rope_factor",
               "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context", "sliding_window",
               "max_position_embeddings")
"""The ModelConfig fields that say what the weights compute: an init_from source decides them."""


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
    """Adam's first-moment decay."""
    b2: float = 0.95
    """Adam's second-moment decay (0.95, as most LLM recipes, reacts faster to loss spikes than 0.999)."""
    eps: float = 1e-8
    """Added to the root of the second moment."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices (norm scales are not decayed)."""
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
class WandbConfig:
    """Weights & Biases experiment tracking (clt/metrics.py `WandbSink`; needs `pip install 'clt[wandb]'`).

    Process 0 sends every metrics row, every event, the resolved config and the plan to one W&B run per
    workdir: its id is kept in <workdir>/wandb/clt-run-id, so a resumed `clt train` continues the same run."""

    project: str = ""
    """W&B project; "" = W&B off (the other fields may still be set, e.g. by a sweep)."""
    entity: str = ""
    """W&B entity (user or team); "" = the account's default."""
    group: str = ""
    """Groups runs in the W&B UI; a sweep sets it to the sweep's name."""
    name: str = ""
    """The run's display name; "" = the workdir's folder name."""
    tags: tuple[str, ...] = ()
    """Tags of the run (a sweep tags each run with its axis values); a single string is one tag."""
    mode: str = ""
    """online: send as it trains. offline: write to the W&B folder only, upload later with `wandb sync`.
    disabled: W&B off. "" = W&B's default: the WANDB_MODE variable (clusters without internet set offline),
    else online."""
    dir: str = ""
    """Folder W&B writes its files into (its wandb/ subfolder); "" = the workdir."""

    def check(self, path: str) -> None:
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"{path}.mode", self.mode, "unknown W&B mode",
                              "use online, offline or disabled (or '' for $WANDB_MODE, else online)")
        bad = sorted(set(self.project) & set(_WANDB_PROJECT_BAD))
        if bad or len(self.project) > 128:
            raise ConfigError(f"{path}.project", self.project, "not a W&B project name" + (
                f" (it cannot contain {' '.join(bad)})" if bad else " (at most 128 characters)"),
                "use letters, digits, - and _")
        if len(self.group) > 128:
            raise ConfigError(f"{path}.group", self.group, "a W&B group has at most 128 characters",
                              "use a shorter group")
        for i, tag in enumerate(self.tags):
            if not tag.strip() or len(tag) > 64:
                raise ConfigError(f"{path}.tags.{i}", tag, "a W&B tag has 1 to 64 characters",
                                  "use short tags, e.g. ('lr=3e-4', 'replay=0.25')")

    @property
    def enabled(self) -> bool:
        return bool(self.project) and self.mode != "disabled"


WANDB_MODES = ("", "online", "offline", "disabled")
_WANDB_PROJECT_BAD = "/\\#?%:"


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    """Steps between log lines (the only host synchronisation in the loop)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <workdir>/tb (needs the tensorboardX package)."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases: set wandb.project to send the run there (see WandbConfig)."""

    def check(self, path: str) -> None:
        if self.every <= 0:
            raise ConfigError(f"{path}.every", self.every, "must be positive", "use e.g. 10")
        self.wandb.check(f"{path}.wandb")


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
                                          did_you_mean(d, domains))
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
        for f in config_fields(type(obj)):
            v = getattr(obj, f.name)
            if f.name in ("mixture", "weights", "domains"):
                out[f.name] = dict(v)
            else:
                out[f.name] = _to_plain(v)
        return out
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj
