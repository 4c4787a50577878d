"""Views of a plan, for `clt plan show` and `clt schedule` (and the plan part of `clt report`).

- counts and mixtures in short text (`fmt_count`, `fmt_mix`); a schedule in words is `schedule.describe`, next
  to its kind's registry entry;
- the plan table: `plan_rows` (one row per phase, wide or narrow), `PLAN_CUT` (which columns may be cut to fit
  a terminal) and `format_table`, the aligned text or Markdown table every clt table is printed with
  (`clt ckpt ls`, `clt prepare` and report.md use it too);
- the plan as curves over steps: `plan_curves` (LR and slot weights), `plan_csv` (`clt plan show --csv`);
- plots: `pyplot` (matplotlib on the Agg backend), `phase_bands`, `domain_colours`, `draw_mixture` (stacked slot
  weights, replay hatched), `plot_plan` (`clt plan show --plot`) and `plot_schedule` (`clt schedule --plot`).

Nothing here reads a run: a run's report (`clt.report`) draws on these; this module never imports it. jax is
imported only inside `plan_curves` (for `lr_at`), so `clt status`, which reads runs without jax, stays fast.
"""

from __future__ import annotations

import numpy as np

from clt.mixture import MixtureSchedule, slot_names
from clt.plan import Plan
from clt.schedule import Schedule, describe


def fmt_count(n: float) -> str:
    """A count in three significant digits with a unit: 7.17K, 1.64M (token counts of the plan table)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def fmt_mix(weights: tuple[float, ...] | None, domains: tuple[str, ...], short: bool = False) -> str:
    """The domains with a weight, as `prose:0.30 code:0.70` ('-' for None); `short` is the narrow table's form."""
    if weights is None:
        return "-"
    used = [(d, w) for d, w in zip(domains, weights) if w > 0]
    if short:  # one domain alone is just its name; weights lose the leading 0: code:.70
        return used[0][0] if len(used) == 1 else " ".join(f"{d}:{w:.2f}".replace(":0.", ":.") for d, w in used)
    return " ".join(f"{d}:{w:.2f}" for d, w in used)


# Narrow plan table: columns that only repeat their default are left out ("--wide" shows them all), and these
# may be cut to fit a terminal, each keeping this many characters while the others can give.
_NARROW_DEFAULTS = {"replay": "-", "upsample": "-", "blend": "-", "optimizer": "keep"}
PLAN_CUT = {"schedule": 26, "mixture": 14, "replay": 14, "upsample": 14}


def plan_rows(plan: Plan, wide: bool = True) -> list[dict]:
    """One dict per phase: what `clt plan show` and report.md print.

    `wide=False` is the terminal form: short schedules and mixtures, no n_steps, and no column that only
    repeats its default (replay, upsample, blend, optimizer), so a usual plan fits 120 columns.
    """
    rows = []
    for p in plan.phases:
        replay = "-"
        if p.replay_share:
            src = "buffer" if p.replay_source == "buffer" else fmt_mix(p.replay_weights, plan.domains, not wide)
            replay = f"{p.replay_share:.0%} ({src})" if wide else f"{p.replay_share:.0%} {src}"
        up = "-"
        if p.upsample_start is not None:
            mix = fmt_mix(p.upsample_mixture, plan.domains, not wide)
            up = f"from {p.upsample_start}: {mix}" if wide else f"@{p.upsample_start} {mix}"
        row = dict(phase=p.name, steps=f"{p.start}-{p.end - 1}", n_steps=p.steps, batch=p.batch_size,
                   tokens=fmt_count(p.rows * plan.seq_len), schedule=describe(p.schedule, short=not wide),
                   mixture=fmt_mix(p.mixture, plan.domains, not wide), replay=replay, upsample=up,
                   blend=p.blend_steps or "-", optimizer=p.optimizer)
        if not wide:
            del row["n_steps"]
        rows.append(row)
    if not wide:
        idle = [c for c, default in _NARROW_DEFAULTS.items() if all(str(r[c]) == default for r in rows)]
        rows = [{k: v for k, v in r.items() if k not in idle} for r in rows]
    return rows


def format_table(rows: list[dict], markdown: bool = False, max_width: int | None = None,
                 cut: dict[str, int] | None = None) -> str:
    """Rows of dicts as an aligned text table (or a Markdown table).

    With `max_width`, columns are narrowed (cells cut with "…") until the table fits, since a terminal wraps
    long lines into an unreadable table. `cut` names the columns that may be cut, each with the width it
    keeps while others can still give (default: every column, down to its header); when that is not enough
    they go down to their headers' widths. Columns not in `cut` (names, step ranges) are never cut.
    """
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    if markdown:
        cells = [[c.replace("|", "\\|") for c in row] for row in cells]  # a '|' in a message would split a cell
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if max_width is not None:
        cut = {c: len(c) for c in cols} if cut is None else cut
        for floors in ([max(cut.get(c, w), len(c)) for c, w in zip(cols, widths)],  # soft: keep `cut`'s widths
                       [len(c) if c in cut else w for c, w in zip(cols, widths)]):  # hard: down to the headers
            while sum(widths) + 2 * (len(cols) - 1) > max_width:
                i = max(range(len(cols)), key=lambda j: widths[j] - floors[j])  # the one with most to give
                if widths[i] <= floors[i]:
                    break
                widths[i] -= 1
        cells = [[v if len(v) <= w else v[:w - 1] + "…" for v, w in zip(row, widths)] for row in cells]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(c) for c in cells])


def plan_curves(plan: Plan, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(steps, lr, slot weights [steps, slots], slot names) over the plan; optionally subsampled."""
    steps = np.arange(plan.total_steps)
    if max_points and len(steps) > max_points:
        steps = np.unique(np.concatenate([np.linspace(0, plan.total_steps - 1, max_points).astype(int),
                                          [p.start for p in plan.phases]]))
    from clt.schedule import lr_at  # jax: imported here, so `clt status` (which reads runs with Run) stays fast

    lr = np.asarray(lr_at(plan, steps))
    mix = MixtureSchedule(plan)
    weights = np.stack([mix.weights_at(int(s)) for s in steps])
    return steps, lr, weights, slot_names(plan.domains)


def plan_csv(plan: Plan) -> str:
    """`clt plan show --csv`: one line per step (step, phase, lr, and the weight of every slot ever used)."""
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


def pyplot():
    """matplotlib.pyplot on the Agg backend: reports are drawn on headless machines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def domain_colours(plan: Plan) -> dict[str, str]:
    """One colour per domain, shared by every plot (a domain's replay slot takes its colour, hatched)."""
    return {d: f"C{i}" for i, d in enumerate(plan.domains)}


def draw_mixture(ax, plan: Plan, steps: np.ndarray, weights: np.ndarray, names: list[str]) -> None:
    """Stacked slot weights over steps: fresh domains solid; replayed ones a pale tint of the domain's colour,
    densely hatched in that colour and opaque, so a thin replay share in a short phase still reads as replay."""
    from matplotlib.colors import to_rgb

    keep = [i for i in range(len(names)) if weights[:, i].any()]
    colours = domain_colours(plan)
    # step="post" draws a step's weights up to the next point: repeat the last one so the final step shows too
    x = np.append(steps, plan.total_steps) if len(steps) and steps[-1] < plan.total_steps else steps
    w = np.concatenate([weights, weights[-1:]]) if len(x) > len(steps) else weights
    polys = ax.stackplot(x, w[:, keep].T, labels=[names[i] for i in keep], step="post")
    for poly, i in zip(polys, keep):
        rgb = np.asarray(to_rgb(colours.get(names[i].removeprefix("replay/"), "0.4")))
        poly.set_linewidth(0)
        if names[i].startswith("replay/"):
            poly.set_facecolor(1 - 0.35 * (1 - rgb))  # a tint: the colour at 35% on white, no transparency
            poly.set_edgecolor(rgb)  # hatch lines take the edge colour
            poly.set_hatch("////")
        else:
            poly.set_facecolor(rgb)
            poly.set_edgecolor(rgb)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of rows")


def plot_plan(plan: Plan, path: str) -> None:
    """LR (top) and stacked slot weights (bottom) over steps, with phase bands."""
    plt = pyplot()
    steps, lr, weights, names = plan_curves(plan, max_points=4000)
    fig, (ax_lr, ax_w) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(1, 1.3))
    ax_lr.plot(steps, lr, color="C3")
    ax_lr.set_ylabel("learning rate")
    phase_bands(ax_lr, plan)
    draw_mixture(ax_w, plan, steps, weights, names)
    phase_bands(ax_w, plan, labels=False)
    ax_w.set_xlabel("step")
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedule(seg: Schedule, steps: np.ndarray, lr: np.ndarray, path: str) -> None:
    """One LR segment over its steps (`clt schedule --plot`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, lr, color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(describe(seg), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
