"""Stability-gap monitoring: when to evaluate (dense around switches), and the gap/recovery/forgetting metrics.

Definitions (DESIGN.md "Monitoring"): an eval row's `step` is the number of updates applied, so the baseline
of a switch at s0 is the eval at step s0, before any update of the new mixture. A switch is any change of
mixture: a phase start, an upsampling start, a blend's start.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from clt.config import MonitorConfig
from clt.mixture import MixtureSchedule
from clt.plan import Plan


def switch_windows(plan: Plan, window: int) -> list[tuple[int, int]]:
    """(s0, end) of each switch's dense window: `window` steps after s0, clipped at the next switch."""
    starts = sorted({s["step"] for s in plan.switches()})
    bounds = starts[1:] + [plan.total_steps]
    return [(s0, min(s0 + window, nxt)) for s0, nxt in zip(starts, bounds)]


def eval_steps(plan: Plan, cfg: MonitorConfig) -> list[int]:
    """Every step (updates applied) at which to evaluate: sparse every `every`, dense every `dense_every`
    inside each switch window, each switch's baseline, every phase end, and the start."""
    total = plan.total_steps
    steps = set(range(0, total + 1, cfg.every)) | {0, total}
    steps |= {p.end for p in plan.phases}
    for s0, end in switch_windows(plan, cfg.dense_window):
        steps.add(s0)
        steps |= set(range(s0, end + 1, cfg.dense_every))
    return sorted(s for s in steps if 0 <= s <= total)


def domain_weights(mixture: MixtureSchedule, step: int) -> np.ndarray:
    """Share of rows of each domain at `step`, fresh and replayed together."""
    w = mixture.weights_at(step)
    D = mixture.D
    return w[:D] + w[D:2 * D]


def eval_curves(rows: Iterable[dict], domains: Iterable[str]) -> dict[str, dict[int, float]]:
    """domain -> {step: eval loss} from metrics rows."""
    curves: dict[str, dict[int, float]] = {d: {} for d in domains}
    for r in rows:
        for d in curves:
            v = r.get(f"eval/{d}/loss")
            if isinstance(v, (int, float)):
                curves[d][int(r["step"])] = float(v)
    return curves


def stability(plan: Plan, rows: Iterable[dict], cfg: MonitorConfig,
              mixture: MixtureSchedule | None = None) -> list[dict]:
    """One entry per (switch, domain) with a baseline: gap, its step, recovery steps, and at the phase end
    forgetting (domain weight fell at the switch) or adaptation (it rose). Pure: recomputable from
    metrics.jsonl at any time; values not yet known are None."""
    mixture = mixture or MixtureSchedule(plan)
    curves = eval_curves(rows, plan.domains)
    switches = {s["step"]: s for s in plan.switches()}
    windows = switch_windows(plan, cfg.dense_window)
    nexts = [w[0] for w in windows[1:]] + [plan.total_steps]
    out = []
    for (s0, wend), s1 in zip(windows, nexts):
        sw = switches[s0]
        phase = plan.phase_at(s0)
        settled = min(s0 + phase.blend_steps, phase.end - 1) if sw["kind"] == "blend" else s0
        w_before, w_after = domain_weights(mixture, s0 - 1), domain_weights(mixture, settled)
        for i, d in enumerate(plan.domains):
            curve = curves[d]
            if s0 not in curve:
                continue
            b = curve[s0]
            entry = dict(switch_step=s0, kind=sw["kind"], phase=phase.name, domain=d, baseline=b, gap=None,
                         gap_step=None, recovery_steps=None, window_end=wend, end_step=phase.end,
                         weight_before=float(w_before[i]), weight_after=float(w_after[i]))
            inside = sorted(t for t in curve if s0 < t <= wend)
            if inside:
                t_peak = max(inside, key=lambda t: curve[t])
                entry["gap"], entry["gap_step"] = curve[t_peak] - b, t_peak
                if entry["gap"] <= cfg.recovery_tol:
                    entry["recovery_steps"] = 0
                else:
                    back = [t for t in sorted(curve) if t_peak < t <= s1 and curve[t] <= b + cfg.recovery_tol]
                    entry["recovery_steps"] = back[0] - s0 if back else None
            if phase.end in curve:
                delta = curve[phase.end] - b
                entry["delta_end"] = delta
                if w_after[i] < w_before[i] - 1e-9:
                    entry["forgetting"] = delta
                elif w_after[i] > w_before[i] + 1e-9:
                    entry["adaptation"] = -delta
            out.append(entry)
    return out


class GapMonitor:
    """Feeds eval rows to `stability` as they arrive and returns the events they trigger: a `stability` event
    when a window closes (gap known), on recovery and at the phase end; `alert`s past the configured
    thresholds (gap, recovery deadline, forgetting). Each event is emitted once."""

    def __init__(self, plan: Plan, cfg: MonitorConfig):
        self.plan, self.cfg, self.mixture = plan, cfg, MixtureSchedule(plan)
        self.rows: list[dict] = []
        self._sent: set[tuple] = set()

    def _once(self, key: tuple) -> bool:
        if key in self._sent:
            return False
        self._sent.add(key)
        return True

    def catch_up(self, rows: list[dict]) -> None:
        """Feed the eval rows of the run before a resume, marking what they triggered as already sent."""
        for row in rows:
            if any(k.startswith("eval/") for k in row):
                self.update(row)

    def update(self, row: dict) -> list[dict]:
        self.rows.append(row)
        step, cfg, out = row["step"], self.cfg, []
        for e in stability(self.plan, self.rows, cfg, self.mixture):
            key = (e["switch_step"], e["domain"])
            where = f"{e['domain']} after the {e['kind']} switch at step {e['switch_step']} ({e['phase']})"
            base = dict(step=step, switch_step=e["switch_step"], domain=e["domain"], phase=e["phase"])
            if e["gap"] is not None and step >= e["window_end"] and self._once(key + ("gap",)):
                out.append(dict(base, event="stability", gap=e["gap"], gap_step=e["gap_step"],
                                baseline=e["baseline"], recovery_steps=e["recovery_steps"]))
            if e["recovery_steps"] and step == e["switch_step"] + e["recovery_steps"] and self._once(key + ("rec",)):
                out.append(dict(base, event="stability", recovery_steps=e["recovery_steps"]))
            if "delta_end" in e and self._once(key + ("end",)):
                out.append(dict(base, event="stability", **{k: e[k] for k in ("delta_end", "forgetting",
                                                                               "adaptation") if k in e}))
            latest = row.get(f"eval/{e['domain']}/loss")
            rise = latest - e["baseline"] if isinstance(latest, (int, float)) else None
            if cfg.gap_alert and rise is not None and step <= e["window_end"] and rise > cfg.gap_alert \
                    and self._once(key + ("gap_alert",)):
                out.append(dict(base, event="alert", alert="gap", value=rise,
                                message=f"stability gap {rise:.3f} > {cfg.gap_alert} on {where}"))
            late = step - e["switch_step"] >= cfg.recovery_deadline
            # recovery_steps is set once the loss came back, even if it rose again later: that met the deadline
            if cfg.recovery_deadline and late and rise is not None and e["gap"] is not None \
                    and e["recovery_steps"] is None and rise > cfg.recovery_tol and step <= e["end_step"] \
                    and self._once(key + ("deadline",)):
                out.append(dict(base, event="alert", alert="recovery", value=step - e["switch_step"],
                                message=f"no recovery within {cfg.recovery_deadline} steps on {where}"))
            fell = e["weight_after"] < e["weight_before"] - 1e-9
            # after the window (a rise there is the gap), or at the phase end even when the window reaches it
            after_gap = step > e["window_end"] or step == e["end_step"]
            if cfg.forgetting_alert and fell and rise is not None and after_gap \
                    and step <= e["end_step"] and rise > cfg.forgetting_alert and self._once(key + ("forget",)):
                out.append(dict(base, event="alert", alert="forgetting", value=rise,
                                message=f"forgetting {rise:.3f} > {cfg.forgetting_alert} on {where}"))
        return out


def describe_event(event: dict) -> str | None:
    """The console line of a stability event (None for other events): what a person watching the run needs
    when a switch's window closes, a domain recovers, or a phase ends."""
    if event.get("event") != "stability":
        return None
    where = f"{event['domain']} after the switch at step {event['switch_step']} ({event['phase']})"
    if "gap" in event:
        rec = event.get("recovery_steps")
        if rec == 0:
            return (f"stability: {where}: no gap (largest change {event['gap']:+.3f} nats, at step "
                    f"{event['gap_step']}; baseline {event['baseline']:.3f})")
        back = f"recovered in {rec} steps" if rec is not None else "not recovered yet"
        return (f"stability: {where}: gap {event['gap']:+.3f} nats at step {event['gap_step']} "
                f"(baseline {event['baseline']:.3f}); {back}")
    if "delta_end" in event:
        if "forgetting" in event:
            what = f"forgetting {event['forgetting']:+.3f}"
        elif "adaptation" in event:
            what = f"adaptation {event['adaptation']:+.3f}"
        else:
            what = f"change {event['delta_end']:+.3f}"
        return f"phase {event['phase']} end: {event['domain']} {what} nats vs its baseline at step {event['switch_step']}"
    return f"stability: {where}: recovered in {event['recovery_steps']} steps"


def describe_switch(plan: Plan, switch: dict) -> str:
    """The console line of a switch (one of `plan.switches()`): the new mixture, replay, blend, LR and optimizer."""
    p = next(q for q in plan.phases if q.name == switch["phase"])
    mix = lambda w: " ".join(f"{d}:{x:.2f}" for d, x in zip(plan.domains, w) if x > 0)  # noqa: E731
    if switch["kind"] == "upsample":
        return f"upsampling starts at step {switch['step']} ({p.name}): {mix(p.upsample_mixture)}"
    text = f"phase {p.name} starts at step {p.start} (to {p.end}): {mix(p.mixture)}"
    if p.replay_share:
        text += f", replay {p.replay_share:.0%} ({p.replay_source})"
    if switch["kind"] == "blend":
        text += f", blended over {p.blend_steps} steps"
    return text + f", LR {p.schedule.kind}, optimizer {p.optimizer}; spike-guard statistics restart"
