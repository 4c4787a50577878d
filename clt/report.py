"""A run's report, from its workdir alone: `clt report WORKDIR` -> <workdir>/report/{report.md, stability.json, *.png}.

- `Run` / `load_run`: a workdir read once (plan.json's plan and monitor settings, metrics.jsonl, events.jsonl);
  `clt status` reads runs with these too;
- the tables of report.md: `stability_json` / `STABILITY_KEYS` (stability.json), `stability_rows`,
  `final_eval_rows`, `alert_rows`;
- the run's plots: `plot_loss`, `plot_train_loss`, `plot_mixture`, `plot_switch` (with `switch_ylim`,
  `gap_verdict`, `plot_titles`, `run_name`; `loss_ylim`, which clt.sweep's curve plots share);
- `write_report`, which renders all of it.

The plan's own table, curves and drawing (bands, domain colours, stacked mixture) come from `clt.plan_view`,
which `clt plan show` uses as well; this module imports it, never the reverse.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

from clt.config import ConfigError, MonitorConfig
from clt.metrics import read_jsonl
from clt.monitor import eval_curves, stability, switch_windows
from clt.plan import Plan
from clt.plan_view import domain_colours, draw_mixture, format_table, phase_bands, plan_curves, plan_rows, pyplot
from clt.resume import PLAN_FILE, read_record

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
    if not (wd / PLAN_FILE).is_file():
        raise ConfigError("workdir", str(wd), "has no plan.json (not a clt run, or its training has not started)",
                          "give the --workdir of a `clt train` run")
    record = read_record(wd)
    return Run(workdir=wd, plan=record.plan, digest=record.digest, monitor=record.config.monitor,
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
    pyplot().close(fig)


def loss_ylim(ax, values: list[float]) -> None:
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
    plt = pyplot()
    steps, lr, _, _ = curves_of_plan
    colours = domain_colours(run.plan)
    curves = eval_curves(run.rows, run.plan.domains)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(10, 6.2), sharex=True, height_ratios=(2.6, 1))
    phase_bands(ax, run.plan)
    _switch_markers(ax, run.plan)
    for d, curve in curves.items():
        if curve:
            t = sorted(curve)
            ax.plot(t, [curve[s] for s in t], color=colours[d], marker="o", ms=2.5, lw=1.4, label=f"{d} (eval)")
    loss_ylim(ax, [v for c in curves.values() for v in c.values()])
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
    plt = pyplot()
    t, loss = map(np.asarray, zip(*pts))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    phase_bands(ax, run.plan)
    _switch_markers(ax, run.plan)
    ax.plot(t, loss, color="0.55", lw=0.8, label="train loss")
    if len(loss) >= 20:
        k = max(3, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(t[k - 1:], smooth, color="k", lw=1.5, label=f"mean of last {k} logs")
    loss_ylim(ax, loss.tolist())
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
    plt = pyplot()
    steps, _, weights, names = curves_of_plan
    fig, ax = plt.subplots(figsize=(10, 3.8))
    draw_mixture(ax, run.plan, steps, weights, names)
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
    plt = pyplot()
    colours = domain_colours(run.plan)
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
