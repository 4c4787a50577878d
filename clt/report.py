"""Tables and plots: the plan (`clt plan show`), and a run's report from its workdir (`clt report`)."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

from clt import config
from clt.config import ConfigError, MonitorConfig
from clt.metrics import read_jsonl
from clt.mixture import MixtureSchedule, slot_names
from clt.monitor import eval_curves, stability, switch_windows
from clt.plan import Plan
from clt.schedule import Schedule as Segment, describe


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _fmt_lr(x: float) -> str:
    """An LR in short scientific form: 3e-4, 1.65e-4 (Python's 'g' writes 0.0003 and 2e-05)."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _fmt_mix(weights: tuple[float, ...] | None, domains: tuple[str, ...], short: bool = False) -> str:
    if weights is None:
        return "-"
    used = [(d, w) for d, w in zip(domains, weights) if w > 0]
    if short:  # one domain alone is just its name; weights lose the leading 0: code:.70
        return used[0][0] if len(used) == 1 else " ".join(f"{d}:{w:.2f}".replace(":0.", ":.") for d, w in used)
    return " ".join(f"{d}:{w:.2f}" for d, w in used)


def describe_segment(seg: Segment, short: bool = False) -> str:
    """A segment in words; `short` is the narrow form of the plan table (LRs as peak->end, lengths in steps)."""
    return describe(seg, short)


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
            src = "buffer" if p.replay_source == "buffer" else _fmt_mix(p.replay_weights, plan.domains, not wide)
            replay = f"{p.replay_share:.0%} ({src})" if wide else f"{p.replay_share:.0%} {src}"
        up = "-"
        if p.upsample_start is not None:
            mix = _fmt_mix(p.upsample_mixture, plan.domains, not wide)
            up = f"from {p.upsample_start}: {mix}" if wide else f"@{p.upsample_start} {mix}"
        row = dict(phase=p.name, steps=f"{p.start}-{p.end - 1}", n_steps=p.steps, batch=p.batch_size,
                   tokens=_fmt_count(p.rows * plan.seq_len), schedule=describe_segment(p.schedule, short=not wide),
                   mixture=_fmt_mix(p.mixture, plan.domains, not wide), replay=replay, upsample=up,
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


def _pyplot():
    """matplotlib.pyplot on the Agg backend: reports are drawn on headless machines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _domain_colours(plan: Plan) -> dict[str, str]:
    """One colour per domain, shared by every plot (a domain's replay slot takes its colour, hatched)."""
    return {d: f"C{i}" for i, d in enumerate(plan.domains)}


def _draw_mixture(ax, plan: Plan, steps: np.ndarray, weights: np.ndarray, names: list[str]) -> None:
    """Stacked slot weights over steps: fresh domains solid; replayed ones a pale tint of the domain's colour,
    densely hatched in that colour and opaque, so a thin replay share in a short phase still reads as replay."""
    from matplotlib.colors import to_rgb

    keep = [i for i in range(len(names)) if weights[:, i].any()]
    colours = _domain_colours(plan)
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
    plt = _pyplot()
    steps, lr, weights, names = plan_curves(plan, max_points=4000)
    fig, (ax_lr, ax_w) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(1, 1.3))
    ax_lr.plot(steps, lr, color="C3")
    ax_lr.set_ylabel("learning rate")
    phase_bands(ax_lr, plan)
    _draw_mixture(ax_w, plan, steps, weights, names)
    phase_bands(ax_w, plan, labels=False)
    ax_w.set_xlabel("step")
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedule(seg: Segment, steps: np.ndarray, lr: np.ndarray, path: str) -> None:
    """One LR segment over its steps (`clt schedule --plot`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, lr, color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(describe_segment(seg), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# A run's report: `clt report WORKDIR` -> <workdir>/report/{report.md, stability.json, *.png}
# ----------------------------------------------------------------------------------------------------------
STABILITY_KEYS = ("switch_step", "kind", "phase", "domain", "baseline", "gap", "gap_step", "recovery_steps")
"""Keys of every stability.json entry; `forgetting` or `adaptation` join them once the phase end is evaluated."""


@dataclass(frozen=True)
class Run:
    """A workdir read once: the plan that ran (plan.json, not today's config), its monitor settings, and the
    metrics and events so far. Everything in the report is computed from this."""

    workdir: pathlib.Path
    plan: Plan
    digest: str
    monitor: MonitorConfig
    rows: list[dict]
    events: list[dict]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if _is_eval(r)]

    @property
    def progress(self) -> int:
        """Updates applied so far: an eval row's step counts updates, a train row's step is the update it made."""
        return max((int(r["step"]) + (0 if _is_eval(r) else 1) for r in self.rows if "step" in r), default=0)

    @property
    def finished(self) -> bool:
        return self.progress >= self.plan.total_steps


def _is_eval(row: dict) -> bool:
    return any(k.startswith("eval/") for k in row)


def load_run(workdir: str | pathlib.Path) -> Run:
    """Read a workdir; a folder that is not a clt run is the user's error, named with its fix."""
    wd = pathlib.Path(workdir)
    path = wd / "plan.json"
    if not path.is_file():
        raise ConfigError("workdir", str(wd), "has no plan.json (not a clt run, or its training has not started)",
                          "give the --workdir of a `clt train` run")
    try:
        saved = json.loads(path.read_text())
        plan = Plan.from_json(saved["plan"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError("plan.json", str(path), f"is not a clt plan file ({type(e).__name__}: {e})",
                          "re-run `clt train` on this workdir to rewrite it") from e
    monitor = config.build(MonitorConfig, saved.get("config", {}).get("monitor", {}), "monitor")
    return Run(workdir=wd, plan=plan, digest=saved.get("digest") or plan.digest(), monitor=monitor,
               rows=read_jsonl(wd / "metrics.jsonl"), events=read_jsonl(wd / "events.jsonl"))


def stability_json(entries: list[dict]) -> list[dict]:
    """`monitor.stability` entries cut to the keys stability.json promises (the rest are the monitor's own)."""
    return [{k: e[k] for k in STABILITY_KEYS + tuple(k for k in ("forgetting", "adaptation") if k in e)}
            for e in entries]


def _num(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _recovery_text(run: Run, e: dict) -> str:
    """Recovery steps, or why there are none: 'none' once the next switch (or the end) was reached without the
    loss coming back, 'not yet' while the run may still get there, '-' without a gap to recover from."""
    if e["gap"] is None:
        return "-"
    if e["recovery_steps"] is not None:
        return str(e["recovery_steps"])
    next_switch = dict(switch_windows(run.plan, run.plan.total_steps))  # an unbounded window ends at the next
    return "none" if run.progress >= next_switch[e["switch_step"]] else "not yet"


def stability_rows(run: Run, entries: list[dict]) -> list[dict]:
    """The stability table of report.md: one row per (switch, domain), unknowns as '-'."""
    rows = []
    for e in entries:
        rows.append({"switch step": e["switch_step"], "kind": e["kind"], "phase": e["phase"],
                     "domain": e["domain"], "baseline": _num(e["baseline"]), "gap": _num(e["gap"], signed=True),
                     "gap step": "-" if e["gap_step"] is None else e["gap_step"],
                     "recovery steps": _recovery_text(run, e), "forgetting": _num(e.get("forgetting"), signed=True),
                     "adaptation": _num(e.get("adaptation"), signed=True)})
    return rows


def final_eval_rows(run: Run) -> list[dict]:
    """Per-domain loss and bits per byte of the latest eval, next to the first eval's for scale."""
    evals = run.evals
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    return [{"domain": d, "loss": _num(last.get(f"eval/{d}/loss")), "bpb": _num(last.get(f"eval/{d}/bpb")),
             f"loss at step {first['step']}": _num(first.get(f"eval/{d}/loss"))}
            for d in run.plan.domains if isinstance(last.get(f"eval/{d}/loss"), (int, float))]


def _task_rows(row: dict) -> list[dict]:
    return [{"task": k.split("/")[2], "accuracy": f"{v:.3f}"} for k, v in sorted(row.items())
            if k.startswith("eval/task/") and k.endswith("/acc") and isinstance(v, (int, float))]


def alert_rows(run: Run) -> list[dict]:
    """Alerts (and a stop they caused) from events.jsonl, in order."""
    rows = []
    for ev in run.events:
        if ev.get("event") == "alert":
            rows.append({"step": ev.get("step"), "alert": ev.get("alert"), "domain": ev.get("domain", "-"),
                         "message": ev.get("message", "")})
        elif ev.get("event") == "stopped":
            rows.append({"step": ev.get("step"), "alert": "stopped", "domain": "-", "message": ev.get("reason", "")})
    return rows


def _switch_markers(ax, plan: Plan) -> None:
    """Dashed lines at phase and blend switches (phase_bands already marks upsampling starts, dotted)."""
    for sw in plan.switches():
        if sw["kind"] != "upsample":
            ax.axvline(sw["step"], color="0.25", ls="--", lw=0.9, zorder=1)


def _switch_legend_handles(plan: Plan) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.25", ls="--", lw=0.9, label="phase switch")]
    if any(p.upsample_start is not None for p in plan.phases):
        handles.append(Line2D([], [], color="0.5", ls=":", lw=0.8, label="upsampling starts"))
    return handles


def _now_marker(ax, run: Run) -> None:
    if not run.finished:
        ax.axvline(run.progress, color="C3", lw=1.2, alpha=0.7, zorder=1)
        ax.text(run.progress, 0.02, f" now: step {run.progress}", transform=ax.get_xaxis_transform(), color="C3",
                fontsize=8, va="bottom")


def run_name(run: Run) -> str:
    """What a plot calls the run: its workdir's folder name (`runs/demo` -> `demo`), as the user named it."""
    return run.workdir.resolve().name or str(run.workdir)


def plot_titles(run: Run, what: str) -> tuple[str, str]:
    """(title, subtitle) of a report plot: the run's name and what is drawn; the plan digest small below, since
    it tells plans apart but means nothing to a reader looking for their run."""
    return f"{run_name(run)}: {what}", f"plan {run.digest}"


def _title_axes(ax, run: Run, what: str) -> None:
    """The title above the phase labels, the digest as a small grey subtitle between the two."""
    title, sub = plot_titles(run, what)
    ax.set_title(title, pad=26)
    ax.annotate(sub, (0.5, 1.0), xycoords="axes fraction", xytext=(0, 14), textcoords="offset points",
                ha="center", va="bottom", fontsize=7.5, color="0.4")


def _save(fig, path: pathlib.Path | str) -> None:
    """Write and close a figure (one place, so tests can look at a figure instead)."""
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _loss_ylim(ax, values: list[float]) -> None:
    """Keep the first evals (random init) from flattening the part worth reading."""
    if len(values) < 4:
        return
    lo, hi = min(values), max(values)
    top = float(np.quantile(values, 0.9))
    if hi - lo > 0 and top - lo > 0 and (hi - lo) > 2.5 * (top - lo):
        pad = 0.08 * (top - lo)
        ax.set_ylim(lo - pad, top + 4 * pad)


def plot_loss(run: Run, curves_of_plan: tuple, path: pathlib.Path) -> None:
    """Per-domain eval loss over steps against the plan (bands, switches) above the LR it ran with."""
    plt = _pyplot()
    steps, lr, _, _ = curves_of_plan
    colours = _domain_colours(run.plan)
    curves = eval_curves(run.rows, run.plan.domains)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(10, 6.2), sharex=True, height_ratios=(2.6, 1))
    phase_bands(ax, run.plan)
    _switch_markers(ax, run.plan)
    for d, curve in curves.items():
        if curve:
            t = sorted(curve)
            ax.plot(t, [curve[s] for s in t], color=colours[d], marker="o", ms=2.5, lw=1.4, label=f"{d} (eval)")
    _loss_ylim(ax, [v for c in curves.values() for v in c.values()])
    _now_marker(ax, run)
    ax.set_ylabel("held-out loss (nats/token)")
    _title_axes(ax, run, "eval loss per domain")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _switch_legend_handles(run.plan),
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(alpha=0.3)

    phase_bands(ax_lr, run.plan, labels=False)
    _switch_markers(ax_lr, run.plan)
    ax_lr.plot(steps, lr, color="C3", lw=1.2, label="planned")
    logged = [(r["step"], r["lr"]) for r in run.rows if isinstance(r.get("lr"), (int, float))]
    if logged:
        ax_lr.plot(*zip(*logged), ls="none", marker=".", ms=3, color="k", label="logged")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step (updates applied)")
    ax_lr.set_xlim(0, run.plan.total_steps)
    ax_lr.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_train_loss(run: Run, path: pathlib.Path) -> bool:
    """Training loss over steps (raw and smoothed) with the plan's bands; False when nothing is logged."""
    pts = [(r["step"], r["loss"]) for r in run.rows if not _is_eval(r) and isinstance(r.get("loss"), (int, float))]
    if not pts:
        return False
    plt = _pyplot()
    t, loss = map(np.asarray, zip(*pts))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    phase_bands(ax, run.plan)
    _switch_markers(ax, run.plan)
    ax.plot(t, loss, color="0.55", lw=0.8, label="train loss")
    if len(loss) >= 20:
        k = max(3, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(t[k - 1:], smooth, color="k", lw=1.5, label=f"mean of last {k} logs")
    _loss_ylim(ax, loss.tolist())
    _now_marker(ax, run)
    ax.set_xlim(0, run.plan.total_steps)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    _title_axes(ax, run, "training loss (on the mixture being trained)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_mixture(run: Run, curves_of_plan: tuple, path: pathlib.Path) -> None:
    """The planned share of rows per slot over steps, the switches the monitor measures marked on it."""
    plt = _pyplot()
    steps, _, weights, names = curves_of_plan
    fig, ax = plt.subplots(figsize=(10, 3.8))
    _draw_mixture(ax, run.plan, steps, weights, names)
    phase_bands(ax, run.plan)
    _switch_markers(ax, run.plan)
    _now_marker(ax, run)
    ax.set_xlim(0, run.plan.total_steps)
    ax.set_xlabel("step")
    _title_axes(ax, run, "data mixture over steps (replayed shares hatched)")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _switch_legend_handles(run.plan),
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _around(curve: dict[int, float], lo: float, hi: float) -> list[int]:
    """Eval steps in [lo, hi] and the nearest one outside on each side, so a zoomed line enters the frame."""
    ts = sorted(curve)
    inside = [t for t in ts if lo <= t <= hi]
    before = [t for t in ts if t < lo][-1:]
    after = [t for t in ts if t > hi][:1]
    return before + inside + after


def switch_ylim(values: list[float], baseline: float, tol: float) -> tuple[float, float]:
    """y-range of a switch panel: the losses shown, and at least 2.5 recovery tolerances either side of the
    baseline, so the tolerance band stays a band (a flat loss would otherwise zoom until it fills the panel)."""
    half = 2.5 * tol if tol > 0 else max(abs(baseline) * 0.01, 1e-3)
    lo, hi = min(*values, baseline - half), max(*values, baseline + half)
    pad = 0.08 * (hi - lo)
    return lo - pad, hi + pad


def gap_verdict(e: dict, tol: float) -> tuple[bool, str]:
    """(mark the gap?, how the panel's title words it), from one rule, the monitor's: a rise of at most
    `recovery_tol` above the baseline (or a fall) is no gap, which is why its recovery is 0 steps."""
    if e["gap_step"] is None:
        return False, "no eval in the window"
    if e["gap"] > tol:
        return True, f"gap {e['gap']:+.3f} at {e['gap_step']}"
    return False, f"no gap (highest {e['gap']:+.3f}, within tol)" if e["gap"] > 0 else f"no gap ({e['gap']:+.3f})"


def plot_switch(run: Run, s0: int, entries: list[dict], path: pathlib.Path) -> None:
    """One switch zoomed: each domain's eval loss from a little before s0 to the window's end (or the
    recovery, if later), its baseline, the dense window, the gap's peak and the recovery point."""
    plt = _pyplot()
    colours = _domain_colours(run.plan)
    curves = eval_curves(run.rows, run.plan.domains)
    tol = run.monitor.recovery_tol
    wend = entries[0]["window_end"]
    right = max([wend] + [s0 + e["recovery_steps"] for e in entries if e["recovery_steps"]])
    pad = max(1.0, 0.15 * (right - s0))
    lo, hi = s0 - pad, min(right + pad, run.plan.total_steps)
    n = len(entries)
    cols = min(n, 3)
    rows_n = -(-n // cols)
    fig = plt.figure(figsize=(max(4.6 * cols, 7.0), 3.4 * rows_n + 0.9), layout="constrained")
    panels = fig.subfigures(1, 1)  # its suptitle is the figure's subtitle, and constrained layout makes room
    axes = panels.subplots(rows_n, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, e in zip(axes.flat, entries):
        d, b, curve, c = e["domain"], e["baseline"], curves[e["domain"]], colours[e["domain"]]
        ts = _around(curve, lo, hi)
        ax.axvspan(s0, wend, color="#fff3c4", zorder=0, label=f"dense window ({s0}-{wend})")
        ax.axvline(s0, color="0.25", ls="--", lw=0.9, label="switch")
        ax.axhspan(b - tol, b + tol, color="0.5", alpha=0.15, lw=0, label=f"baseline ± recovery tol ({tol:g})")
        ax.axhline(b, color="0.15", lw=1.0, label="baseline (eval at the switch)")
        ax.plot(ts, [curve[t] for t in ts], color=c, marker="o", ms=3.5, lw=1.4, label="eval loss")
        marked, verdict = gap_verdict(e, tol)
        notes = [f"baseline {b:.3f}", verdict]
        if marked:
            tp, peak = e["gap_step"], curve[e["gap_step"]]
            ax.annotate("", xy=(tp, peak), xytext=(tp, b), arrowprops=dict(arrowstyle="->", color="C3", lw=1.3))
            ax.plot([tp], [peak], marker="v", ms=8, color="C3", ls="none",
                    label="gap: highest point, above tol")
        if e["recovery_steps"]:
            tr = s0 + e["recovery_steps"]
            ax.plot([tr], [curve[tr]], marker="o", ms=10, mfc="none", mec="C2", mew=2, ls="none",
                    label="back within tol")
            notes.append(f"recovered in {e['recovery_steps']} steps")
        elif e["recovery_steps"] is None and e["gap"] is not None:
            notes.append(f"recovery: {_recovery_text(run, e)}")
        ax.set_ylim(*switch_ylim([curve[t] for t in ts if lo <= t <= hi], b, tol))
        ax.set_xlim(lo, hi)
        ax.set_title(f"{d}: weight {e['weight_before']:.2f} → {e['weight_after']:.2f}\n" + ", ".join(notes),
                     fontsize=9)
        ax.set_xlabel("step (updates applied)")
        ax.set_ylabel(f"{d} held-out loss")
        ax.grid(alpha=0.3)
    # one legend for the figure: the same marks mean the same in every panel
    labelled: dict[str, object] = {}
    for ax in axes.flat[:n]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(lab, h)
    fig.legend(labelled.values(), labelled.keys(), loc="outside lower center",
               ncol=min(len(labelled), 3 if cols > 1 else 2),
               fontsize=8, frameon=False)
    sw = entries[0]
    what = "upsampling starts in" if sw["kind"] == "upsample" else f"{sw['kind']} switch to"
    title, sub = plot_titles(run, f"step {s0}, {what} phase '{sw['phase']}'")
    fig.suptitle(title, fontsize=11)
    panels.suptitle(sub, fontsize=7.5, color="0.4")
    _save(fig, path)


def write_report(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Render `<workdir>/report/` (or `out`): report.md, stability.json and the PNGs it links. Works on a
    finished run and on one in progress, since everything is recomputed from the workdir's files."""
    run = load_run(workdir)
    folder = pathlib.Path(out) if out is not None else run.workdir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plan = run.plan

    entries = stability(plan, run.rows, run.monitor)  # from metrics.jsonl alone, as the monitor defines them
    (folder / "stability.json").write_text(json.dumps(stability_json(entries), indent=1) + "\n")

    curves_of_plan = plan_curves(plan, max_points=4000)
    plot_mixture(run, curves_of_plan, folder / "mixture.png")
    has_evals = bool(run.evals)
    if has_evals:
        plot_loss(run, curves_of_plan, folder / "loss.png")
    has_train = plot_train_loss(run, folder / "train_loss.png")
    by_switch: dict[int, list[dict]] = {}
    for e in entries:
        by_switch.setdefault(e["switch_step"], []).append(e)
    for s0, group in by_switch.items():
        plot_switch(run, s0, group, folder / f"switch_{s0}.png")

    # ---- report.md
    status = "finished" if run.finished else "in progress"
    pct = 100 * run.progress / plan.total_steps
    md = [f"# Run report: {run_name(run)}", "",
          f"Plan `{run.digest}`, `{run.workdir}`: step {run.progress} / {plan.total_steps} ({pct:.0f}%), **{status}**; "
          f"{len(plan.phases)} phases over domains {', '.join(plan.domains)}.", ""]
    if not run.rows:
        md += ["**No metrics yet**: metrics.jsonl is empty or missing, so there is nothing to plot but the plan.", ""]
    md += ["## Plan", "", format_table(plan_rows(plan), markdown=True), "", "![mixture](mixture.png)", ""]

    md += ["## Loss", ""]
    md += ["![eval loss and learning rate](loss.png)", ""] if has_evals else ["No eval rows yet.", ""]
    if has_train:
        md += ["![train loss](train_loss.png)", ""]

    finals = final_eval_rows(run)
    if finals:
        last = run.evals[-1]
        md += [f"## Latest eval (step {last['step']})", "", format_table(finals, markdown=True), ""]
        tasks = _task_rows(last)
        if tasks:
            md += [format_table(tasks, markdown=True), ""]

    mc = run.monitor
    md += ["## Stability at switches", "",
           f"Baseline: eval loss at the switch step, before any update of the new mixture. Gap: the largest rise "
           f"above it within the dense window ({mc.dense_window} steps, clipped at the next switch), at its gap "
           f"step; at most {mc.recovery_tol:g} (or negative) means no gap. Recovery: steps from the switch until "
           f"the loss is back within {mc.recovery_tol:g} of the baseline ('none': not before the next switch; "
           f"'not yet': the run has not got there). Forgetting / adaptation: loss change at the phase end for "
           f"domains whose weight fell / the loss drop for those whose weight rose. Values in nats; also in "
           f"`stability.json`.", ""]
    if entries:
        md += [format_table(stability_rows(run, entries), markdown=True), ""]
    else:
        md += ["No switch has been evaluated yet.", ""]
    pending = [sw for sw in plan.switches() if sw["step"] not in by_switch]
    if pending:
        md += ["Switches without a baseline eval yet: "
               + ", ".join(f"step {sw['step']} ({sw['kind']}, {sw['phase']})" for sw in pending) + ".", ""]
    for s0 in by_switch:
        md += [f"![switch at step {s0}](switch_{s0}.png)", ""]

    md += ["## Alerts", ""]
    alerts = alert_rows(run)
    md += [format_table(alerts, markdown=True) if alerts else "None.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(md))
    return path
