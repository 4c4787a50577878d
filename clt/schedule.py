"""Learning-rate schedules: one pure function per shape, composed over a plan's phases by `lr_at`.

Why not optax schedules: they read the optimizer state's own `count`, which is checkpointed and goes stale
when a plan changes (a new phase's warmup would start at the wrong place). clt computes the LR from its own
global step, `lr_at(plan, step)`, and the train step writes it into the injected hyperparameters.

Conventions (DESIGN.md "LR schedules"): t = steps since the segment start, T = segment length, W = warmup
steps; the last step's LR is the formula at t = T - 1 (just above `end`). Every function works on numpy or
jax arrays and is jit-traceable in `t` (the segment constants are static Python numbers).
"""

from __future__ import annotations

import jax.numpy as jnp

from clt.plan import Plan, PhasePlan, Segment


def _safe(x):
    return jnp.maximum(x, 1)


def warmup(t, W: int, target):
    """Linear warmup from 0 at t = 0 towards `target` at t = W."""
    return target * t / _safe(W)


def constant(t, T: int, W: int, peak: float):
    return jnp.where(t < W, warmup(t, W, peak), peak)


def linear(t, T: int, W: int, peak: float, end: float):
    return jnp.where(t < W, warmup(t, W, peak), peak - (peak - end) * (t - W) / _safe(T - W))


def cosine(t, T: int, W: int, peak: float, end: float):
    decayed = end + 0.5 * (peak - end) * (1 + jnp.cos(jnp.pi * (t - W) / _safe(T - W)))
    return jnp.where(t < W, warmup(t, W, peak), decayed)


def inverse_sqrt(t, T: int, W: int, peak: float):
    decayed = peak * jnp.sqrt(max(W, 1) / jnp.maximum(jnp.maximum(t, W), 1))
    return jnp.where(t < W, warmup(t, W, peak), decayed)


def decay_shape(u, shape: str):
    """Fraction of the way from peak to end after progress u in [0, 1] of a decay."""
    if shape == "linear":
        return u
    if shape == "cosine":
        return 0.5 * (1 - jnp.cos(jnp.pi * u))
    if shape == "1-sqrt":
        return jnp.sqrt(u)
    raise ValueError(f"unknown decay shape {shape!r}; use linear, cosine or 1-sqrt")


def wsd(t, T: int, W: int, D: int, peak: float, end: float, shape: str):
    """Warmup-stable-decay: constant peak, then the last D steps decay to `end` (MiniCPM; Haegele et al.)."""
    u = jnp.clip((t - (T - D)) / _safe(D), 0.0, 1.0)
    stable_or_decay = peak - (peak - end) * decay_shape(u, shape)
    return jnp.where(t < W, warmup(t, W, peak), stable_or_decay)


def infinite_cooldown(x, peak: float, const: float, shape: str, alpha: float):
    """LR after progress x in [0, 1] of the cooldown from peak to const (Ibrahim et al. 2024)."""
    if shape == "cosine":
        return const + 0.5 * (peak - const) * (1 + jnp.cos(jnp.pi * x))
    h = lambda v: 1 / jnp.sqrt(1 + alpha * v) - 1  # noqa: E731
    return peak + (const - peak) * h(x) / h(1.0)


def infinite(tc, s_anneal, seg: Segment):
    """Infinite schedule at `tc` steps after its chain start, `s_anneal` steps into this phase's anneal
    (negative before it): warmup and cooldown once, constant across phases, an anneal at a task's end."""
    W, C = seg.warmup, seg.cooldown
    x = jnp.clip((tc - W) / _safe(C), 0.0, 1.0)
    lr = jnp.where(tc < W, warmup(tc, W, seg.peak), infinite_cooldown(x, seg.peak, seg.const, seg.shape, seg.alpha))
    if seg.anneal:
        u = jnp.clip(s_anneal / seg.anneal, 0.0, 1.0)
        if seg.anneal_shape == "exponential":
            annealed = seg.const * (seg.end / seg.const) ** u
        else:
            annealed = seg.const + (seg.end - seg.const) * u
        lr = jnp.where(s_anneal >= 0, annealed, lr)
    return lr


def power(t, T: int, W: int, D: int, seg: Segment, batch: int, tokens_at):
    """Power scheduler (Shen et al. 2024): eta = min(peak, batch * a * n**b), n = tokens seen since the plan
    start; linear warmup to eta(W); exponential decay over the last D steps to `end`."""
    eta = lambda n: jnp.minimum(seg.peak, batch * seg.a * jnp.maximum(n, 1.0) ** seg.b)  # noqa: E731
    lr = jnp.where(t < W, warmup(t, W, eta(tokens_at(W))), eta(tokens_at(t)))
    if D:
        at_decay = eta(tokens_at(T - D))
        s = t - (T - D)
        lr = jnp.where(s >= 0, at_decay * (seg.end / at_decay) ** (s / D), lr)
    return lr


def segment_lr(p: PhasePlan, step, seq_len: int):
    """LR of phase `p` at global `step` (which should lie in the phase)."""
    seg, T, t = p.schedule, p.steps, step - p.start
    if seg.kind == "constant":
        return constant(t, T, seg.warmup, seg.peak)
    if seg.kind == "linear":
        return linear(t, T, seg.warmup, seg.peak, seg.end)
    if seg.kind == "cosine":
        return cosine(t, T, seg.warmup, seg.peak, seg.end)
    if seg.kind == "inverse_sqrt":
        return inverse_sqrt(t, T, seg.warmup, seg.peak)
    if seg.kind == "wsd":
        return wsd(t, T, seg.warmup, seg.decay, seg.peak, seg.end, seg.shape)
    if seg.kind == "infinite":
        return infinite(step - seg.chain_start, step - (p.end - seg.anneal), seg)
    if seg.kind == "power":
        tokens_at = lambda tt: (p.row_start + tt * p.batch_size) * float(seq_len)  # noqa: E731
        return power(t, T, seg.warmup, seg.decay, seg, p.batch_size, tokens_at)
    raise ValueError(f"unknown schedule kind {seg.kind!r}")


def lr_at(plan: Plan, step):
    """The learning rate at global `step` (scalar or array, traced or not); 0 past the plan's end."""
    step = jnp.asarray(step)
    lr = jnp.zeros(step.shape, jnp.float32)
    for p in plan.phases:
        inside = (step >= p.start) & (step < p.end)
        lr = jnp.where(inside, segment_lr(p, step.astype(jnp.float32), plan.seq_len), lr)
    return lr
