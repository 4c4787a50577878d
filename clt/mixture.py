"""Domain weights over steps, and the block-exact, stateless assignment of rows to domains.

Design (DESIGN.md "Data"): a plan is cut into *stages*, runs of steps with constant weights (a phase's main
part, its upsampling window, and each step of a blend, which is its own stage because the weights change
every step). Within a stage, rows are grouped in blocks of K rows counted from the stage's first row; every
block holds exact largest-remainder counts of each *slot* (fresh domain d, replayed domain d, or the replay
buffer), in an order permuted by a generator seeded with (seed, stage, block). The replayed share of a block is
exactly round(r x K). Because block contents are a pure function of (seed, plan, stage, block), any step's rows
can be produced without replaying history, and the number of earlier draws of every domain is closed-form:
there is no iterator state to checkpoint.

A domain's draws are counted jointly over fresh and replayed rows (one stream per domain), so replay walks on
through the domain's epochs instead of repeating its first examples; the replay buffer has its own counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clt.plan import PhasePlan, Plan, fresh_weights, weight_spans


def slot_names(domains: tuple[str, ...]) -> list[str]:
    """Slots in row assignments: fresh domains, then replayed domains, then the replay buffer."""
    return list(domains) + [f"replay/{d}" for d in domains] + ["replay/buffer"]


def largest_remainder(total: int, weights: np.ndarray, tie_rank: np.ndarray | None = None) -> np.ndarray:
    """Integer counts summing to `total`, closest to total x weights; equal remainders go to the lowest
    `tie_rank` (default: the earlier index)."""
    w = np.asarray(weights, np.float64)
    if total == 0 or w.sum() <= 0:
        return np.zeros(len(w), np.int64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum()
    rank = np.arange(len(w)) if tie_rank is None else np.asarray(tie_rank)
    order = np.lexsort((rank, -(exact - counts)))
    counts[order[:short]] += 1
    return counts


def slot_weights(plan: Plan, p: PhasePlan, step: int) -> np.ndarray:
    """Nominal weight of every slot at `step`: (1 - r) x fresh, r x replay weights (or the buffer)."""
    D = len(plan.domains)
    out = np.zeros(2 * D + 1)
    r = p.replay_share
    out[:D] = (1 - r) * fresh_weights(plan, p, step)
    if r > 0:
        if p.replay_source == "buffer":
            out[2 * D] = r
        else:
            out[D:2 * D] = r * np.asarray(p.replay_weights, np.float64)
    return out


def block_counts(weights: np.ndarray, block: int, replay_share: float, domains: tuple[str, ...]) -> np.ndarray:
    """Exact slot counts of one block: round(r x K) replayed rows, the rest fresh, each split by largest
    remainder (ties by domain name, so the config's domain order does not matter)."""
    D = len(domains)
    n_replay = int(np.floor(replay_share * block + 0.5)) if replay_share > 0 else 0
    name_rank = np.argsort(np.argsort(domains))
    counts = np.zeros(len(weights), np.int64)
    counts[:D] = largest_remainder(block - n_replay, weights[:D], name_rank)
    counts[D:] = largest_remainder(n_replay, weights[D:], np.append(name_rank, D))
    return counts


@dataclass(frozen=True)
class Stage:
    index: int
    phase: int
    step_start: int
    step_end: int
    row_start: int
    row_end: int
    block: int
    """K: rows per block (a blend step is one block of its batch)."""
    weights: np.ndarray
    """Nominal slot weights."""
    counts: np.ndarray
    """Exact slot counts per full block."""
    draws_before: np.ndarray
    """Draws of each counter (D domains, then the buffer) before this stage."""
    order: np.ndarray
    """`canonical_order` of the plan's slots."""


def counter_of(slots: np.ndarray, D: int) -> np.ndarray:
    """Slot -> draw counter: fresh and replayed rows of domain d share counter d; the buffer has counter D."""
    return np.where(slots < 2 * D, slots % D, D)


def canonical_order(domains: tuple[str, ...]) -> np.ndarray:
    """Slot ids by (fresh, replay, buffer), then domain name. A block lays its slots out in this order before
    permuting, so the rows of the past do not move when a later config declares a new domain (wherever its
    name sorts) or lists the domains in another order."""
    D = len(domains)
    keys = [(0, d) for d in domains] + [(1, d) for d in domains] + [(2, "")]
    return np.array(sorted(range(2 * D + 1), key=lambda i: keys[i]))


def block_slots(seed: int, stage: Stage, b: int) -> np.ndarray:
    """Slots of block b of a stage, in their permuted order: a pure function of (seed, stage, block)."""
    slots = np.repeat(stage.order, stage.counts[stage.order])
    return slots[np.random.default_rng([seed, stage.index, b]).permutation(len(slots))]


def stage_draws(seed: int, D: int, stage: Stage) -> np.ndarray:
    """Draws of each counter over a whole stage (full blocks, then the leading part of the last)."""
    full, rem = divmod(stage.row_end - stage.row_start, stage.block)
    out = full * _per_block(stage, D)
    if rem:
        out = out + np.bincount(counter_of(block_slots(seed, stage, full)[:rem], D), minlength=D + 1)
    return out


def _per_block(stage: Stage, D: int) -> np.ndarray:
    return np.bincount(counter_of(np.repeat(np.arange(len(stage.counts)), stage.counts), D), minlength=D + 1)


def _phase_stages(plan: Plan, p: PhasePlan, first_index: int, draws_before: np.ndarray) -> list[Stage]:
    """A phase's stages: each blend step on its own (one block of its batch), the main part, the upsampling."""
    D = len(plan.domains)
    stages, draws = [], draws_before
    for s0, s1 in weight_spans(p):
        K = p.batch_size if s0 < p.start + p.blend_steps else plan.block_rows  # a blend step: one block of its batch
        w = slot_weights(plan, p, s0)
        rows0 = p.row_start + (s0 - p.start) * p.batch_size
        stage = Stage(index=first_index + len(stages), phase=p.index, step_start=s0, step_end=s1,
                      row_start=rows0, row_end=rows0 + (s1 - s0) * p.batch_size, block=K, weights=w,
                      counts=block_counts(w, K, p.replay_share, plan.domains), draws_before=draws,
                      order=canonical_order(plan.domains))
        stages.append(stage)
        draws = draws + stage_draws(plan.seed, D, stage)
    return stages


class MixtureSchedule:
    """The stages of a plan and the row assignment of any step."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.D = len(plan.domains)
        self.stages: list[Stage] = []
        draws = np.zeros(self.D + 1, np.int64)
        for p in plan.phases:
            new = _phase_stages(plan, p, len(self.stages), draws)
            self.stages.extend(new)
            draws = new[-1].draws_before + stage_draws(plan.seed, self.D, new[-1])
        self._step_starts = np.array([s.step_start for s in self.stages])
        self._row_starts = np.array([s.row_start for s in self.stages])

    def stage_at(self, step: int) -> Stage:
        if not 0 <= step < self.stages[-1].step_end:
            raise IndexError(f"step {step} is outside the plan (steps 0..{self.stages[-1].step_end - 1})")
        return self.stages[int(np.searchsorted(self._step_starts, step, side="right")) - 1]

    def weights_at(self, step: int) -> np.ndarray:
        """Nominal slot weights in effect at `step`."""
        return self.stage_at(step).weights

    def rows(self, row_start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, draw index) of global rows [row_start, row_start + n), which must lie in one stage.

        The draw index k of a row is how many earlier rows drew from the same counter (its domain, or the
        buffer); the data pipeline maps (domain, k) to an example."""
        stage = self.stages[int(np.searchsorted(self._row_starts, row_start, side="right")) - 1]
        if row_start + n > stage.row_end:
            raise IndexError(f"rows [{row_start}, {row_start + n}) cross the end of stage {stage.index}")
        D, offset = self.D, row_start - stage.row_start
        per_block = _per_block(stage, D)
        slots_out, draws_out = [], []
        for b in range(offset // stage.block, (offset + n - 1) // stage.block + 1):
            slots = block_slots(self.plan.seed, stage, b)
            counters = counter_of(slots, D)
            rank = np.empty(len(slots), np.int64)  # rank of each position among its counter's positions
            for c in range(D + 1):
                where = np.flatnonzero(counters == c)
                rank[where] = np.arange(len(where))
            draws = stage.draws_before[counters] + b * per_block[counters] + rank
            lo, hi = max(offset - b * stage.block, 0), min(offset + n - b * stage.block, stage.block)
            slots_out.append(slots[lo:hi])
            draws_out.append(draws[lo:hi])
        return np.concatenate(slots_out), np.concatenate(draws_out)

    def rows_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, draw index) of every row of `step`'s batch."""
        return self.rows(self.plan.rows_before(step), self.plan.phase_at(step).batch_size)
