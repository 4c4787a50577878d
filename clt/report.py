"""Tables and plots: the plan (`clt plan show`), and a run's report from its workdir (`clt report`)."""

from __future__ import annotations

import numpy as np

from clt.mixture import MixtureSchedule, slot_names
from clt.plan import Plan, Segment
from clt.schedule import lr_at


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _fmt_mix(weights: tuple[float, ...] | None, domains: tuple[str, ...]) -> str:
    if weights is None:
        return "-"
    return " ".join(f"{d}:{w:.2f}" for d, w in zip(domains, weights) if w > 0)


def describe_segment(seg: Segment) -> str:
    s = f"{seg.kind} peak={seg.peak:g}"
    if seg.warmup:
        s += f" warmup={seg.warmup}"
    if seg.kind in ("linear", "cosine", "wsd", "infinite", "power"):
        s += f" end={seg.end:g}"
    if seg.kind in ("wsd", "power") and seg.decay:
        s += f" decay={seg.decay}" + (f" ({seg.shape})" if seg.kind == "wsd" else "")
    if seg.kind == "infinite":
        s += f" const={seg.const:g} cooldown={seg.cooldown} ({seg.shape})"
        if seg.anneal:
            s += f" anneal={seg.anneal} ({seg.anneal_shape}{', branch' if seg.branch else ''})"
    return s


def plan_rows(plan: Plan) -> list[dict]:
    """One dict per phase: what `clt plan show` and report.md print."""
    rows = []
    for p in plan.phases:
        replay = "-"
        if p.replay_share:
            src = "buffer" if p.replay_source == "buffer" else _fmt_mix(p.replay_weights, plan.domains)
            replay = f"{p.replay_share:.0%} ({src})"
        up = "-"
        if p.upsample_start is not None:
            up = f"from {p.upsample_start}: {_fmt_mix(p.upsample_mixture, plan.domains)}"
        rows.append(dict(phase=p.name, steps=f"{p.start}-{p.end - 1}", n_steps=p.steps, batch=p.batch_size,
                         tokens=_fmt_count(p.rows * plan.seq_len), schedule=describe_segment(p.schedule),
                         mixture=_fmt_mix(p.mixture, plan.domains), replay=replay, upsample=up,
                         blend=p.blend_steps or "-", optimizer=p.optimizer))
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Rows of dicts as an aligned text table (or a Markdown table)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(c) for c in cells])


def plan_curves(plan: Plan, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(steps, lr, slot weights [steps, slots], slot names) over the plan; optionally subsampled."""
    steps = np.arange(plan.total_steps)
    if max_points and len(steps) > max_points:
        steps = np.unique(np.concatenate([np.linspace(0, plan.total_steps - 1, max_points).astype(int),
                                          [p.start for p in plan.phases]]))
    lr = np.asarray(lr_at(plan, steps))
    mix = MixtureSchedule(plan)
    weights = np.stack([mix.weights_at(int(s)) for s in steps])
    return steps, lr, weights, slot_names(plan.domains)


def plan_csv(plan: Plan) -> str:
    steps, lr, weights, names = plan_curves(plan)
    keep = [i for i in range(len(names)) if weights[:, i].any()]
    head = ["step", "phase", "lr"] + [f"w/{names[i]}" for i in keep]
    phase_of = np.searchsorted([p.start for p in plan.phases], steps, side="right") - 1
    out = [",".join(head)]
    for j, s in enumerate(steps):
        vals = [str(s), plan.phases[phase_of[j]].name, f"{lr[j]:.6g}"] + [f"{weights[j, i]:.4f}" for i in keep]
        out.append(",".join(vals))
    return "\n".join(out)


def phase_bands(ax, plan: Plan, labels: bool = True) -> None:
    """Shade alternate phases and name them, so every plot reads against the plan."""
    for p in plan.phases:
        if p.index % 2:
            ax.axvspan(p.start, p.end, color="0.92", zorder=0)
        if labels:
            ax.text((p.start + p.end) / 2, 1.0, p.name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8)
        if p.upsample_start is not None:
            ax.axvline(p.upsample_start, color="0.5", ls=":", lw=0.8)


def plot_plan(plan: Plan, path: str) -> None:
    """LR (top) and stacked slot weights (bottom) over steps, with phase bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, lr, weights, names = plan_curves(plan, max_points=4000)
    fig, (ax_lr, ax_w) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(1, 1.3))
    ax_lr.plot(steps, lr, color="C3")
    ax_lr.set_ylabel("learning rate")
    phase_bands(ax_lr, plan)
    keep = [i for i in range(len(names)) if weights[:, i].any()]
    colours = {n: f"C{i}" for i, n in enumerate(plan.domains)}
    styles = [dict(color=colours.get(names[i].removeprefix("replay/"), "0.4"),
                   alpha=0.45 if names[i].startswith("replay/") else 0.9,
                   hatch="//" if names[i].startswith("replay/") else None) for i in keep]
    polys = ax_w.stackplot(steps, weights[:, keep].T, labels=[names[i] for i in keep], step="post")
    for poly, st in zip(polys, styles):
        poly.set_facecolor(st["color"])
        poly.set_alpha(st["alpha"])
        if st["hatch"]:
            poly.set_hatch(st["hatch"])
    phase_bands(ax_w, plan, labels=False)
    ax_w.set_ylim(0, 1)
    ax_w.set_ylabel("share of rows")
    ax_w.set_xlabel("step")
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
