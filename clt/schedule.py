"""Learning-rate schedules: one registry of kinds (`KINDS`), composed over a plan's phases by `lr_at`.

Why not optax schedules: they read the optimizer state's own `count`, which is checkpointed and goes stale
when a plan changes (a new phase's warmup would start at the wrong place). clt computes the LR from its own
global step, `lr_at(plan, step)`, and the train step writes it into the injected hyperparameters.

A kind is one `Kind` entry in `KINDS`: the fields its formula reads, which of them are lengths, its default
shape, the formula, a one-line description and its own checks. Config validation (clt/config/schema.py),
plan resolution (clt/plan.py), what "the schedule changed" means on resume (`Schedule.defining`), the plan
table (`describe`) and `lr_at` all loop over the registry, so adding a kind is adding its entry here.

This module is the bottom of clt: it imports nothing from clt (config and plan import it), and no jax at
import time, since `clt status` reads plans without jax. The formulas are written against an array namespace
`xp` (`lr_at` passes jax.numpy): they are jit-traceable in the step, with the segment's constants as static
Python numbers.

Conventions (DESIGN.md "LR schedules"): t = steps since the segment start, T = segment length, W = warmup
steps; the last step's LR is the formula at t = T - 1 (just above `end`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

Problem = tuple[str, str, str]
"""(field, problem, fix): one thing wrong with a config's schedule; config validation names the field's path."""

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
"""Shapes of a decay from peak to end (`decay_shape`): wsd's `shape`."""

NON_NEGATIVE = ("warmup", "peak", "end", "decay", "const", "cooldown", "anneal", "alpha", "a")
"""Fields no kind may set below 0 (the power exponent `b` is negative)."""


@dataclass(frozen=True)
class Schedule:
    """One LR segment: a phase's `schedule` as a config gives it (the field group validated by clt.config) and,
    once plan.py has resolved it, with every length in whole steps (what `lr_at` and plan.json hold).

    Which fields a kind reads is its `KINDS` entry; a field its kind does not read is carried as given (a
    length it does not read resolves to 0). The field order is plan.json's."""

    kind: str = "cosine"
    """A key of KINDS: constant | linear | cosine | inverse_sqrt | wsd | infinite | power."""
    peak: float = 3e-4
    """Peak LR (eta_max); power: the cap of its formula."""
    end: float = 0.0
    """Final LR (eta_min) that decays approach; must not exceed `peak`."""
    warmup: float = 0
    """Warmup steps, or a fraction of the segment when < 1. In a later phase this is the re-warm."""
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
    chain_start: int = dataclasses.field(default=0, metadata={"plan_only": True})
    """Set by plan.py, not a config key: the first step of the phases the segment spans (its phase's first step,
    except in a kind that chains across phases, like infinite, whose warmup and cooldown happen once)."""

    def defining(self) -> dict:
        """The fields this kind's formula reads: what "the schedule changed" means on resume (a field the kind
        ignores, like a cosine's `shape`, may differ in a plan.json written by another clt version)."""
        return {"kind": self.kind, "peak": self.peak, **{k: getattr(self, k) for k in KINDS[self.kind].reads}}

    def problems(self) -> list[Problem]:
        """What is wrong with this config schedule of a known kind: the checks every kind shares, then its own."""
        kind = KINDS[self.kind]
        found = [(name, "must be >= 0", "use a value >= 0") for name in NON_NEGATIVE if getattr(self, name) < 0]
        if self.end > self.peak:
            found.append(("end", f"end LR is above the {kind.peak_word} {self.peak}", "lower `end` or raise `peak`"))
        return found + (kind.problems(self) if kind.problems else [])


@dataclass(frozen=True)
class Clock:
    """A step as a kind's formula sees it (the arrays may be jax tracers)."""

    step: Any
    """The global step (float32)."""
    t: Any
    """Steps since the segment's (its phase's) first step."""
    T: int
    """The segment's length in steps."""
    phase: Any
    """The PhasePlan: start, end, row_start, batch_size (power counts tokens; infinite finds its anneal)."""
    seq_len: int


LrFn = Callable[[Any, Schedule, Clock], Any]
"""(xp, resolved schedule, clock) -> LR, on the array namespace xp."""


@dataclass(frozen=True)
class Kind:
    """A schedule kind: everything config checks, plan resolution, resume, the plan table and `lr_at` know of it."""

    description: str
    """One line: what the LR does after the warmup."""
    reads: tuple[str, ...]
    """Schedule fields that define the segment beyond kind and peak: what the formula reads (and infinite's
    branch). Resume compares these; the plan table shows `end` when it is read."""
    lengths: tuple[str, ...]
    """Those of `reads` that are lengths: steps, or a fraction of the phase when < 1 (resolved by plan.py).
    After `warmup`, each must fit in the phase together with the warmup."""
    lr: LrFn
    """The formula."""
    shape: str = ""
    """The `shape` a config gets when it leaves it out."""
    problems: Callable[[Schedule], list[Problem]] | None = None
    """Kind-specific checks of a config's schedule (after the shared ones of `Schedule.problems`)."""
    peak_word: str = "peak"
    """What `peak` is to this kind, in error messages."""
    lrs: Callable[[Schedule], tuple[float, ...]] | None = None
    """The LRs the plan table's short form chains (default: peak, then end when the kind reads it)."""
    details: Callable[[Schedule, bool], str] | None = None
    """The text `describe` adds after the LRs and warmup (short form when the flag is set)."""
    chains: tuple[str, ...] = ()
    """Non-empty for a kind whose segment spans consecutive phases of the kind (infinite): the fields a later
    phase of the run takes from its own config; the rest, warmup and cooldown included, come from the first."""

    def __post_init__(self):
        fields = {f.name for f in dataclasses.fields(Schedule)} - {"kind", "peak"}
        for name in self.reads + self.chains:
            if name not in fields:
                raise ValueError(f"a schedule kind reads {name!r}, which is no Schedule field")
        for name in self.lengths:
            if name not in self.reads:
                raise ValueError(f"the length {name!r} is not among the fields the kind reads {self.reads}")


# ----------------------------------------------------------------------------------------------------------
# The formulas. Same operations in the same order as ever: training results depend on them bit for bit.
# ----------------------------------------------------------------------------------------------------------
def _safe(xp, x):
    return xp.maximum(x, 1)


def warmup(xp, t, W: int, target):
    """Linear warmup from 0 at t = 0 towards `target` at t = W."""
    return target * t / _safe(xp, W)


def constant(xp, s: Schedule, c: Clock):
    return xp.where(c.t < s.warmup, warmup(xp, c.t, s.warmup, s.peak), s.peak)


def linear(xp, s: Schedule, c: Clock):
    t, T, W = c.t, c.T, s.warmup
    return xp.where(t < W, warmup(xp, t, W, s.peak), s.peak - (s.peak - s.end) * (t - W) / _safe(xp, T - W))


def cosine(xp, s: Schedule, c: Clock):
    t, T, W = c.t, c.T, s.warmup
    decayed = s.end + 0.5 * (s.peak - s.end) * (1 + xp.cos(xp.pi * (t - W) / _safe(xp, T - W)))
    return xp.where(t < W, warmup(xp, t, W, s.peak), decayed)


def inverse_sqrt(xp, s: Schedule, c: Clock):
    t, W = c.t, s.warmup
    decayed = s.peak * xp.sqrt(max(W, 1) / xp.maximum(xp.maximum(t, W), 1))
    return xp.where(t < W, warmup(xp, t, W, s.peak), decayed)


def decay_shape(xp, u, shape: str):
    """Fraction of the way from peak to end after progress u in [0, 1] of a decay."""
    if shape == "linear":
        return u
    if shape == "cosine":
        return 0.5 * (1 - xp.cos(xp.pi * u))
    if shape == "1-sqrt":
        return xp.sqrt(u)
    raise ValueError(f"unknown decay shape {shape!r}; use linear, cosine or 1-sqrt")


def wsd(xp, s: Schedule, c: Clock):
    """Warmup-stable-decay: constant peak, then the last D steps decay to `end` (MiniCPM; Haegele et al.)."""
    t, T, W, D = c.t, c.T, s.warmup, s.decay
    u = xp.clip((t - (T - D)) / _safe(xp, D), 0.0, 1.0)
    stable_or_decay = s.peak - (s.peak - s.end) * decay_shape(xp, u, s.shape)
    return xp.where(t < W, warmup(xp, t, W, s.peak), stable_or_decay)


def infinite_cooldown(xp, x, s: Schedule):
    """LR after progress x in [0, 1] of the cooldown from peak to const (Ibrahim et al. 2024)."""
    if s.shape == "cosine":
        return s.const + 0.5 * (s.peak - s.const) * (1 + xp.cos(xp.pi * x))
    h = lambda v: 1 / xp.sqrt(1 + s.alpha * v) - 1  # noqa: E731
    return s.peak + (s.const - s.peak) * h(x) / h(1.0)


def infinite(xp, s: Schedule, c: Clock):
    """Warmup and cooldown once from the chain start, constant across phases, and an anneal over the last
    `anneal` steps of a phase that ends a task."""
    tc, s_anneal = c.step - s.chain_start, c.step - (c.phase.end - s.anneal)  # s_anneal < 0 before the anneal
    W, C = s.warmup, s.cooldown
    x = xp.clip((tc - W) / _safe(xp, C), 0.0, 1.0)
    lr = xp.where(tc < W, warmup(xp, tc, W, s.peak), infinite_cooldown(xp, x, s))
    if s.anneal:
        u = xp.clip(s_anneal / s.anneal, 0.0, 1.0)
        if s.anneal_shape == "exponential":
            annealed = s.const * (s.end / s.const) ** u
        else:
            annealed = s.const + (s.end - s.const) * u
        lr = xp.where(s_anneal >= 0, annealed, lr)
    return lr


def power(xp, s: Schedule, c: Clock):
    """Power scheduler (Shen et al. 2024): eta = min(peak, batch * a * n**b), n = tokens seen since the plan
    start; linear warmup to eta(W); exponential decay over the last D steps to `end`."""
    t, T, W, D, p = c.t, c.T, s.warmup, s.decay, c.phase
    tokens_at = lambda tt: (p.row_start + tt * p.batch_size) * float(c.seq_len)  # noqa: E731
    eta = lambda n: xp.minimum(s.peak, p.batch_size * s.a * xp.maximum(n, 1.0) ** s.b)  # noqa: E731
    lr = xp.where(t < W, warmup(xp, t, W, eta(tokens_at(W))), eta(tokens_at(t)))
    if D:
        at_decay = eta(tokens_at(T - D))
        since = t - (T - D)
        lr = xp.where(since >= 0, at_decay * (s.end / at_decay) ** (since / D), lr)
    return lr


# ----------------------------------------------------------------------------------------------------------
# Kind-specific checks and plan-table words.
# ----------------------------------------------------------------------------------------------------------
def _decay_fraction(s: Schedule) -> list[Problem]:
    if not 0 <= s.decay <= 1:
        return [("decay", "decay is a fraction of the segment", "use a value in [0, 1], e.g. 0.2")]
    return []


def _wsd_problems(s: Schedule) -> list[Problem]:
    found = _decay_fraction(s)
    if s.shape not in DECAY_SHAPES + ("",):
        found.append(("shape", "unknown WSD decay shape", f"use one of {DECAY_SHAPES}"))
    return found


def _power_problems(s: Schedule) -> list[Problem]:
    found = _decay_fraction(s)
    if s.decay > 0 and s.end <= 0:
        found.append(("end", "the power schedule's exponential decay needs end > 0", "set end to e.g. 1e-5"))
    return found


def _infinite_problems(s: Schedule) -> list[Problem]:
    found = []
    if s.shape not in ("cosine", "inverse_sqrt", ""):
        found.append(("shape", "unknown infinite cooldown shape", "use cosine or inverse_sqrt"))
    if s.anneal_shape not in ("exponential", "linear"):
        found.append(("anneal_shape", "unknown anneal shape", "use exponential or linear"))
    if not s.end <= s.const <= s.peak:
        found.append(("const", f"need end ({s.end}) <= const <= peak ({s.peak})", "set const between end and peak"))
    if s.anneal_shape == "exponential" and s.anneal and (s.end <= 0 or s.const <= 0):
        found.append(("end", "an exponential anneal needs end > 0 and const > 0",
                      "set end > 0 or use anneal_shape='linear'"))
    if s.branch and not s.anneal:
        found.append(("branch", "a branch needs an anneal", "set anneal > 0"))
    return found


def _decay_words(s: Schedule, short: bool, shape: bool = False) -> str:
    """wsd and power: the decay steps, and with `shape` the decay's shape (in the short form only when it is not
    the kind's default)."""
    if not s.decay:
        return ""
    if short:
        return f" decay {s.decay}" + (f" {s.shape}" if shape and s.shape != KINDS[s.kind].shape else "")
    return f" decay={s.decay}" + (f" ({s.shape})" if shape else "")


def _infinite_words(s: Schedule, short: bool) -> str:
    if short:
        text = f" cool {s.cooldown}" + (f" {s.shape}" if s.shape != KINDS[s.kind].shape else "")
        return text + (f" anneal {s.anneal}" + (" branch" if s.branch else "") if s.anneal else "")
    text = f" const={s.const:g} cooldown={s.cooldown} ({s.shape})"
    return text + (f" anneal={s.anneal} ({s.anneal_shape}{', branch' if s.branch else ''})" if s.anneal else "")


# ----------------------------------------------------------------------------------------------------------
# The registry: adding a kind is adding its entry (README "Adding a schedule kind").
# ----------------------------------------------------------------------------------------------------------
KINDS: dict[str, Kind] = {
    "constant": Kind("peak", reads=("warmup",), lengths=("warmup",), lr=constant),
    "linear": Kind("linear decay from peak to end", reads=("warmup", "end"), lengths=("warmup",), lr=linear),
    "cosine": Kind("cosine decay from peak to end", reads=("warmup", "end"), lengths=("warmup",), lr=cosine),
    "inverse_sqrt": Kind("peak * sqrt(W / t)", reads=("warmup",), lengths=("warmup",), lr=inverse_sqrt),
    "wsd": Kind("warmup-stable-decay: peak, then the last `decay` decays to end by `shape`",
                reads=("warmup", "end", "decay", "shape"), lengths=("warmup", "decay"), lr=wsd, shape="1-sqrt",
                problems=_wsd_problems, details=lambda s, short: _decay_words(s, short, shape=True)),
    "infinite": Kind("cooldown to const, const across infinite phases, an anneal to end where a task ends",
                     reads=("warmup", "end", "shape", "const", "cooldown", "anneal", "anneal_shape", "branch",
                            "alpha", "chain_start"),
                     lengths=("warmup", "anneal", "cooldown"), lr=infinite, shape="cosine",
                     problems=_infinite_problems, details=_infinite_words,
                     lrs=lambda s: (s.peak, s.const) + ((s.end,) if s.anneal else ()),
                     chains=("end", "anneal", "anneal_shape", "branch")),
    "power": Kind("min(peak, batch * a * tokens**b), then an exponential decay to end over the last `decay`",
                  reads=("warmup", "end", "decay", "a", "b"), lengths=("warmup", "decay"), lr=power,
                  problems=_power_problems, peak_word="peak cap", details=_decay_words),
}


def length_fields() -> set[str]:
    """Every field that some kind reads as a length (a kind that does not read one resolves it to 0)."""
    return {name for kind in KINDS.values() for name in kind.lengths}


# ----------------------------------------------------------------------------------------------------------
# Over a plan.
# ----------------------------------------------------------------------------------------------------------
def segment_lr(xp, p, step, seq_len: int):
    """LR of phase `p` (a PhasePlan) at global `step`, which should lie in the phase."""
    s = p.schedule
    if s.kind not in KINDS:
        raise ValueError(f"unknown schedule kind {s.kind!r}")
    return KINDS[s.kind].lr(xp, s, Clock(step=step, t=step - p.start, T=p.steps, phase=p, seq_len=seq_len))


def lr_at(plan: Any, step: Any) -> Any:
    """The learning rate at global `step` (scalar or array, traced or not); 0 past the plan's end.

    `plan` is read duck-typed: its phases' start, end, steps, row_start, batch_size, schedule, and seq_len."""
    import jax.numpy as jnp  # here, not at the top: reading a plan (`clt status`) must not import jax

    step = jnp.asarray(step)
    lr = jnp.zeros(step.shape, jnp.float32)
    for p in plan.phases:
        inside = (step >= p.start) & (step < p.end)
        lr = jnp.where(inside, segment_lr(jnp, p, step.astype(jnp.float32), plan.seq_len), lr)
    return lr


def _fmt_lr(x: float) -> str:
    """An LR in short scientific form: 3e-4, 1.65e-4 (Python's 'g' writes 0.0003 and 2e-05)."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def describe(s: Schedule, short: bool = False) -> str:
    """A resolved segment in words; `short` is the narrow form of the plan table (LRs as peak->end, lengths in
    steps)."""
    kind = KINDS[s.kind]
    if short:
        lrs = kind.lrs(s) if kind.lrs else (s.peak,) + ((s.end,) if "end" in kind.reads else ())
        text = f"{s.kind} {'->'.join(_fmt_lr(x) for x in lrs)}" + (f" w{s.warmup}" if s.warmup else "")
    else:
        text = f"{s.kind} peak={s.peak:g}" + (f" warmup={s.warmup}" if s.warmup else "")
        text += f" end={s.end:g}" if "end" in kind.reads else ""
    return text + (kind.details(s, short) if kind.details else "")
