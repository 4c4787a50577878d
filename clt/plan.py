"""The phase plan: a validated config resolved into absolute step ranges, "what holds at step s".

Every duration (steps, tokens, percent of a budget) and every fraction (warmup, decay, cooldown, anneal,
upsampling window) becomes an integer number of steps here, once, with the rounding rules of DESIGN.md:
tokens -> ceil(tokens / (batch x seq_len)); fractions -> round(fraction x phase steps). Everything downstream
(schedule.py, mixture.py, the data pipeline, the trainer) reads only the resolved `Plan`. A phase's schedule
is resolved through the registry of kinds in schedule.py (its lengths become steps), and replay weights pro
rata to earlier phases' fresh rows are computed here (`fresh_weights`: what holds at step s).

The resolved plan is written to `<workdir>/plan.json` when a run starts and is the authority on resume:
phases that already ran keep their step ranges even if the config's percents change later (`resolve(...,
past=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from clt.config import Config, ConfigError, PhaseConfig
from clt.schedule import KINDS, Schedule, length_fields


@dataclass(frozen=True)
class PhasePlan:
    """One resolved phase. Weights are tuples over `Plan.domains`."""

    name: str
    index: int
    start: int
    """First step (global; the number of updates applied before it)."""
    end: int
    """One past the last step."""
    batch_size: int
    row_start: int
    """Global row (sequence) number of the phase's first row."""
    mixture: tuple[float, ...]
    schedule: Schedule
    """The phase's LR segment, every length in steps."""
    optimizer: str = "keep"
    replay_share: float = 0.0
    replay_source: str = "mixture"
    replay_weights: tuple[float, ...] = ()
    """Over domains; pro rata to the fresh rows of earlier phases unless the config gave weights."""
    upsample_start: int | None = None
    upsample_mixture: tuple[float, ...] | None = None
    blend_steps: int = 0

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def rows(self) -> int:
        return self.steps * self.batch_size


@dataclass(frozen=True)
class Plan:
    domains: tuple[str, ...]
    seq_len: int
    seed: int
    block_rows: int
    phases: tuple[PhasePlan, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    @property
    def total_rows(self) -> int:
        return self.phases[-1].row_start + self.phases[-1].rows

    def phase_index(self, step: int) -> int:
        """Index of the phase that holds `step` (the last phase for steps past the end)."""
        starts = [p.start for p in self.phases]
        return max(0, int(np.searchsorted(starts, step, side="right")) - 1)

    def phase_at(self, step: int) -> PhasePlan:
        return self.phases[self.phase_index(step)]

    def rows_before(self, step: int) -> int:
        """g_s: global rows trained before `step`; step s trains rows [g_s, g_s + B_s)."""
        p = self.phase_at(step)
        return p.row_start + (min(step, p.end) - p.start) * p.batch_size

    def switches(self) -> list[dict]:
        """Every change of mixture: phase starts (after the first), blend starts, upsampling starts."""
        out = []
        for p in self.phases:
            if p.index > 0:
                out.append(dict(step=p.start, kind="blend" if p.blend_steps else "phase", phase=p.name))
            if p.upsample_start is not None:
                out.append(dict(step=p.upsample_start, kind="upsample", phase=p.name))
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Plan":
        phases = []
        for p in d["phases"]:
            p = dict(p)
            p["schedule"] = Schedule(**p["schedule"])
            for k in ("mixture", "replay_weights"):
                p[k] = tuple(p[k])
            if p.get("upsample_mixture") is not None:
                p["upsample_mixture"] = tuple(p["upsample_mixture"])
            phases.append(PhasePlan(**p))
        return Plan(domains=tuple(d["domains"]), seq_len=d["seq_len"], seed=d["seed"],
                    block_rows=d["block_rows"], phases=tuple(phases))

    def with_domains(self, domains: tuple[str, ...]) -> "Plan":
        """The same plan with weights re-indexed over `domains` (a later run may declare new domains); a
        domain with weight that `domains` lacks is an error."""
        if domains == self.domains:
            return self
        missing = [d for d in self.domains if d not in domains]

        def remap(w: tuple[float, ...] | None, what: str, phase: str) -> tuple[float, ...] | None:
            if w is None or not w:
                return w
            named = dict(zip(self.domains, w))
            lost = [d for d in missing if named[d] > 0]
            if lost:
                raise ConfigError("data.domains", list(domains), f"phase {phase!r} ({what}) used {lost}, which are "
                                  "no longer declared", "keep declaring them (their data may be deleted)")
            return tuple(named.get(d, 0.0) for d in domains)

        phases = tuple(dataclasses.replace(
            p, mixture=remap(p.mixture, "mixture", p.name), replay_weights=remap(p.replay_weights, "replay", p.name),
            upsample_mixture=remap(p.upsample_mixture, "upsample", p.name)) for p in self.phases)
        return dataclasses.replace(self, domains=tuple(domains), phases=phases)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Resolution.
# ----------------------------------------------------------------------------------------------------------
def _frac_steps(value: float, total: int, path: str) -> int:
    """A length given as steps (>= 1) or as a fraction (< 1) of `total` steps."""
    if value < 1:
        return int(round(value * total))
    if value != int(value):
        raise ConfigError(path, value, "a length >= 1 is a whole number of steps", "use an integer or a fraction < 1")
    return int(value)


def _phase_steps(ph: PhaseConfig, cfg: Config, batch: int, path: str) -> int:
    tokens_per_step = batch * cfg.data.seq_len
    if ph.steps is not None:
        return ph.steps
    if ph.tokens is not None:
        return math.ceil(ph.tokens / tokens_per_step)
    assert cfg.budget is not None  # checked by Config.check
    if cfg.budget.steps is not None:
        steps = round(ph.percent / 100 * cfg.budget.steps)
    else:
        steps = math.ceil(ph.percent / 100 * cfg.budget.tokens / tokens_per_step)
    if steps < 1:
        raise ConfigError(f"{path}.percent", ph.percent, "resolves to 0 steps", "raise the percent or the budget")
    return steps


def _segment(s: Schedule, T: int, start: int, chain_head: Schedule | None, path: str) -> Schedule:
    """A config's schedule -> the phase's segment: the lengths its kind reads in steps, the others 0."""
    kind = KINDS[s.kind]
    if kind.chains:
        return _chained_segment(s, T, start, chain_head, path)
    steps = {name: _frac_steps(getattr(s, name), T, f"{path}.{name}") for name in kind.lengths}
    W = steps.get("warmup", 0)
    if W >= T and W > 0:
        raise ConfigError(f"{path}.warmup", s.warmup, f"warmup ({W} steps) must be shorter than the phase "
                          f"({T} steps)", "shorten the warmup or lengthen the phase")
    for name, L in steps.items():
        if name != "warmup" and W + L > T:
            raise ConfigError(f"{path}.{name}", getattr(s, name), f"warmup ({W}) + {name} ({L}) steps exceed the "
                              f"phase ({T})", f"shorten the warmup or the {name}")
    return _with_steps(s, start, steps)


def _with_steps(s: Schedule, start: int, steps: dict[str, int]) -> Schedule:
    """`s` starting at `start` with its lengths in `steps`, the lengths its kind does not read 0 and the kind's
    default shape where the config left it out."""
    unread = {name: 0 for name in length_fields() - steps.keys()}
    return dataclasses.replace(s, shape=s.shape or KINDS[s.kind].shape, chain_start=start, **steps, **unread)


def _chained_segment(s: Schedule, T: int, start: int, head: Schedule | None, path: str) -> Schedule:
    """The infinite kind, whose segment spans consecutive phases of the kind: the first phase of the run (no
    `head`) resolves the warmup and cooldown, which happen once; a later phase continues the head's segment at
    const (no re-warm, the point of the schedule), taking only the kind's `chains` fields (its anneal) from
    its own config."""
    kind = KINDS[s.kind]
    own = {name: _frac_steps(getattr(s, name), T, f"{path}.{name}") if name in kind.lengths else getattr(s, name)
           for name in (kind.chains if head is not None else kind.lengths)}
    seg = _with_steps(s, start, own) if head is None else dataclasses.replace(head, **own)
    # The anneal must start after the warmup and cooldown are done.
    ramp_end = seg.chain_start + seg.warmup + seg.cooldown
    if seg.anneal and start + T - seg.anneal < ramp_end:
        raise ConfigError(f"{path}.anneal", s.anneal, f"the anneal ({seg.anneal} steps) starts before "
                          f"warmup+cooldown end at step {ramp_end}", "shorten the anneal, warmup or cooldown")
    if head is None and seg.warmup >= T:
        raise ConfigError(f"{path}.warmup", s.warmup, f"warmup ({seg.warmup} steps) must be shorter than the phase "
                          f"({T} steps)", "shorten the warmup")
    return seg


def _weights(mix: tuple[tuple[str, float], ...], domains: tuple[str, ...]) -> tuple[float, ...]:
    d = dict(mix)
    return tuple(float(d.get(name, 0.0)) for name in domains)


def resolve(cfg: Config, past: Plan | None = None, through_step: int = 0) -> Plan:
    """Resolve `cfg` into a Plan. With `past`, phases of `past` that started before `through_step` are kept
    exactly as they ran (the resolved plan is the authority on resume) and the rest are resolved after them."""
    domains = cfg.domain_names()
    past = past.with_domains(domains) if past is not None else None
    kept = [p for p in past.phases if p.start < through_step] if past is not None else []
    phases: list[PhasePlan] = list(kept)
    step = kept[-1].end if kept else 0
    row = kept[-1].row_start + kept[-1].rows if kept else 0
    chain_head = kept[-1].schedule if kept and _chains(kept[-1].schedule) else None
    for i, ph in enumerate(cfg.phases):
        if i < len(kept):
            continue
        path = f"phases.{ph.name}"
        batch = ph.batch_size or cfg.batch_size
        T = _phase_steps(ph, cfg, batch, path)
        head = chain_head if chain_head is not None and chain_head.kind == ph.schedule.kind else None
        seg = _segment(ph.schedule, T, step, head, f"{path}.schedule")
        chain_head = seg if _chains(seg) else None
        up_start = up_mix = None
        if ph.upsample is not None:
            L = _frac_steps(ph.upsample.last, T, f"{path}.upsample.last")
            if not 0 < L < T:
                raise ConfigError(f"{path}.upsample.last", ph.upsample.last,
                                  f"resolves to {L} of the phase's {T} steps", "use a window inside the phase")
            up_start, up_mix = step + T - L, _weights(ph.upsample.mixture, domains)
        if ph.blend_steps and i == 0:
            raise ConfigError(f"{path}.blend_steps", ph.blend_steps, "the first phase has nothing to blend from",
                              "set blend_steps=0 on the first phase")
        if ph.blend_steps >= (up_start - step if up_start is not None else T):
            raise ConfigError(f"{path}.blend_steps", ph.blend_steps, "the blend must end before the phase "
                              "(and its upsampling window)", "shorten blend_steps")
        if batch % cfg.optim.grad_accum:
            raise ConfigError("optim.grad_accum", cfg.optim.grad_accum,
                              f"does not divide {path}'s batch of {batch}", "choose a divisor of the batch size")
        phases.append(PhasePlan(
            name=ph.name, index=i, start=step, end=step + T, batch_size=batch, row_start=row,
            mixture=_weights(ph.mixture, domains), schedule=seg, optimizer=ph.optimizer,
            replay_share=ph.replay.share, replay_source=ph.replay.source,
            replay_weights=_weights(ph.replay.weights, domains) if ph.replay.weights else (),
            upsample_start=up_start, upsample_mixture=up_mix, blend_steps=ph.blend_steps))
        step, row = step + T, row + T * batch
    if kept and [p.name for p in kept] != [ph.name for ph in cfg.phases[:len(kept)]]:
        raise ConfigError("phases", [ph.name for ph in cfg.phases], "the phases that already ran were renamed "
                          f"or reordered (ran: {[p.name for p in kept]})", "keep past phases as they were")
    plan = Plan(domains=domains, seq_len=cfg.data.seq_len, seed=cfg.seed, block_rows=cfg.data.block_rows,
                phases=tuple(phases))
    return _with_pro_rata_replay(plan)


def _chains(s: Schedule) -> bool:
    """Whether a later phase of the same kind continues this segment (a kind this clt lacks does not)."""
    return s.kind in KINDS and bool(KINDS[s.kind].chains)


# ----------------------------------------------------------------------------------------------------------
# What holds at step s, and the replay weights that follow from it.
# ----------------------------------------------------------------------------------------------------------
def weight_spans(p: PhasePlan) -> list[tuple[int, int]]:
    """Runs [s0, s1) of a phase's steps with constant fresh weights: each blend step on its own (the weights
    change every step), the main part, the upsampling window; empty runs are left out."""
    spans = [(s, s + 1) for s in range(p.start, p.start + p.blend_steps)]
    main_end = p.upsample_start if p.upsample_start is not None else p.end
    spans.append((p.start + p.blend_steps, main_end))
    if p.upsample_start is not None:
        spans.append((p.upsample_start, p.end))
    return [(s0, s1) for s0, s1 in spans if s1 > s0]


def fresh_weights(plan: Plan, p: PhasePlan, step: int) -> np.ndarray:
    """Weights of fresh data at `step` of phase `p`: mixture, upsampling window, or a blend step."""
    w = np.asarray(p.mixture, np.float64)
    if p.upsample_start is not None and step >= p.upsample_start:
        w = np.asarray(p.upsample_mixture, np.float64)
    t = step - p.start
    if p.index > 0 and t < p.blend_steps:
        prev = plan.phases[p.index - 1]
        w_prev = np.asarray(prev.upsample_mixture if prev.upsample_mixture is not None else prev.mixture)
        a = (t + 1) / (p.blend_steps + 1)  # every blend step differs from both ends
        w = (1 - a) * w_prev + a * w
    return w


def _with_pro_rata_replay(plan: Plan) -> Plan:
    """Fill in pro-rata replay weights: each domain in proportion to the fresh rows earlier phases drew, i.e.
    the sum over their weight spans of (1 - replay share) x fresh weights x rows (in this order: the weights
    of a plan.json must not change with the clt version)."""
    phases = list(plan.phases)
    fresh = np.zeros(len(plan.domains))
    for i, p in enumerate(phases):
        if p.replay_share > 0 and p.replay_source == "mixture" and not p.replay_weights:
            phases[i] = dataclasses.replace(p, replay_weights=tuple(float(x) for x in fresh / fresh.sum()))
        for s0, s1 in weight_spans(p):
            fresh += ((1 - p.replay_share) * fresh_weights(plan, p, s0)) * ((s1 - s0) * p.batch_size)
    return dataclasses.replace(plan, phases=tuple(phases))
