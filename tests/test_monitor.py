"""Stability-gap metrics on synthetic eval curves with known answers, the eval schedule, and the alerts."""

import pytest

from clt import config, plan
from clt.config import MonitorConfig
from clt.monitor import GapMonitor, eval_steps, stability, switch_windows


def resolve(*phases):
    raw = dict(data=dict(domains={"a": "-", "b": "-"}, seq_len=16, block_rows=64), batch_size=8, phases=phases)
    return plan.resolve(config.from_dict(raw))


def ph(name, steps, mixture, **kw):
    return dict(name=name, steps=steps, mixture=mixture, schedule=dict(kind="constant", peak=1e-3), **kw)


# a (step 0-9) -> b (10-29), upsampled to a:b = 1:1 over the last 5 steps: switches at 10 (phase) and 25 (upsample)
SHIFT = (ph("x", 10, {"a": 1.0}), ph("y", 20, {"b": 1.0}, upsample=dict(last=5, mixture={"a": 0.5, "b": 0.5})))
TOL = 0.25  # exact in binary, so "back within tol" is tested at equality


def rows(a: dict[int, float], b: dict[int, float] | None = None) -> list[dict]:
    """Eval rows (step = updates applied) from per-domain {step: loss}; b defaults to a flat 3.0."""
    b = b if b is not None else {t: 3.0 for t in a}
    return [{"step": t, "phase": "?", "eval/a/loss": a[t], "eval/b/loss": b[t]} for t in sorted(a)]


def entry(entries, s0, domain):
    found = [e for e in entries if e["switch_step"] == s0 and e["domain"] == domain]
    assert len(found) == 1, entries
    return found[0]


def cfg(**kw):
    kw.setdefault("recovery_tol", TOL)
    kw.setdefault("dense_window", 6)
    return MonitorConfig(every=8, dense_every=2, **kw)


def test_eval_steps_are_sparse_dense_baselines_and_phase_ends():
    pl = resolve(*SHIFT)
    assert switch_windows(pl, 6) == [(10, 16), (25, 30)]  # the last window is clipped at the end
    assert switch_windows(pl, 4) == [(10, 14), (25, 29)]
    # sparse 0, 8, 16, 24 (+ the end 30); dense every 2 from each switch through its window's end: 10..14 and
    # 25..29; baselines 10 and 25; phase ends 10 and 30
    assert eval_steps(pl, MonitorConfig(every=8, dense_every=2, dense_window=4)) == [
        0, 8, 10, 12, 14, 16, 24, 25, 27, 29, 30]


def test_gap_is_the_peak_inside_the_window_and_recovery_counts_from_the_switch():
    pl = resolve(*SHIFT)
    # window (10, 16]: peak +0.5 at 14; step 17 is higher but outside; back to baseline + tol at 20
    curve = {8: 2.9, 10: 2.0, 12: 2.3, 14: 2.5, 16: 2.4, 17: 2.9, 18: 2.3, 20: 2.25, 22: 2.0}
    e = entry(stability(pl, rows(curve), cfg()), 10, "a")
    assert (e["baseline"], e["gap"], e["gap_step"]) == (2.0, pytest.approx(0.5), 14)
    assert e["recovery_steps"] == 20 - 10
    assert (e["kind"], e["phase"], e["window_end"], e["end_step"]) == ("phase", "y", 16, 30)


def test_a_gap_within_tolerance_recovers_at_once():
    pl = resolve(*SHIFT)
    e = entry(stability(pl, rows({10: 2.0, 12: 2.25, 14: 2.1}), cfg()), 10, "a")
    assert e["gap"] == pytest.approx(0.25) and e["recovery_steps"] == 0


def test_no_recovery_before_the_next_switch_is_none():
    pl = resolve(*SHIFT)
    # above baseline + tol until the next switch at 25; the drop at 27 belongs to the next switch
    curve = {10: 2.0, 12: 2.6, 16: 2.5, 24: 2.3, 25: 2.3, 27: 1.9}
    e = entry(stability(pl, rows(curve), cfg()), 10, "a")
    assert e["gap"] == pytest.approx(0.6) and e["recovery_steps"] is None


def test_an_empty_window_has_no_gap():
    pl = resolve(*SHIFT)
    e = entry(stability(pl, rows({8: 2.5, 10: 2.0, 24: 2.9}), cfg()), 10, "a")
    assert (e["gap"], e["gap_step"], e["recovery_steps"]) == (None, None, None)


def test_a_switch_without_its_baseline_has_no_entry():
    pl = resolve(*SHIFT)
    entries = stability(pl, rows({8: 2.5, 12: 2.9, 16: 2.0}), cfg())
    assert entries == []


def test_the_window_is_clipped_at_the_next_switch():
    # switches at 10 (phase) and 14 (upsample): a 10-step window after 10 ends at 14
    pl = resolve(ph("x", 10, {"a": 1.0}), ph("y", 8, {"b": 1.0}, upsample=dict(last=4, mixture={"a": 1.0})))
    assert switch_windows(pl, 10) == [(10, 14), (14, 18)]
    curve = {10: 2.0, 12: 2.3, 14: 2.4, 16: 3.5, 18: 2.0}
    e = entry(stability(pl, rows(curve), cfg(dense_window=10)), 10, "a")
    assert (e["gap"], e["gap_step"], e["window_end"]) == (pytest.approx(0.4), 14, 14)
    assert e["recovery_steps"] is None  # 18 is past the next switch


def test_forgetting_for_the_domain_that_fell_and_adaptation_for_the_one_that_rose():
    pl = resolve(*SHIFT)
    a = {10: 2.0, 12: 2.2, 30: 2.6}
    b = {10: 3.0, 12: 2.9, 30: 2.2}
    ea, eb = entry(stability(pl, rows(a, b), cfg()), 10, "a"), entry(stability(pl, rows(a, b), cfg()), 10, "b")
    assert (ea["weight_before"], ea["weight_after"]) == (1.0, 0.0)
    assert ea["forgetting"] == pytest.approx(0.6) and "adaptation" not in ea
    assert eb["adaptation"] == pytest.approx(0.8) and "forgetting" not in eb
    # before the phase end is evaluated neither is known
    early = entry(stability(pl, rows({10: 2.0, 12: 2.2}), cfg()), 10, "a")
    assert "forgetting" not in early and "delta_end" not in early


def test_upsampling_reverses_who_forgets():
    pl = resolve(*SHIFT)
    a = {25: 2.5, 27: 2.4, 30: 2.3}
    b = {25: 2.0, 27: 2.1, 30: 2.2}
    entries = stability(pl, rows(a, b), cfg())
    ea, eb = entry(entries, 25, "a"), entry(entries, 25, "b")
    assert ea["kind"] == "upsample" and ea["adaptation"] == pytest.approx(0.2)
    assert eb["forgetting"] == pytest.approx(0.2)


def test_a_blend_is_judged_by_its_settled_weights():
    pl = resolve(ph("x", 10, {"a": 1.0}), ph("y", 10, {"b": 1.0}, blend_steps=4))
    e = entry(stability(pl, rows({10: 2.0, 20: 2.5}), cfg()), 10, "a")
    assert e["kind"] == "blend" and (e["weight_before"], e["weight_after"]) == (1.0, 0.0)
    assert e["forgetting"] == pytest.approx(0.5)


def feed(monitor, rs):
    return [ev for r in rs for ev in monitor.update(r)]


def test_gap_alert_fires_once():
    pl = resolve(*SHIFT)
    events = feed(GapMonitor(pl, cfg(gap_alert=0.3)), rows({8: 2.5, 10: 2.0, 12: 2.4, 14: 2.5, 16: 2.1}))
    alerts = [e for e in events if e["event"] == "alert"]
    assert [(e["alert"], e["domain"], e["step"]) for e in alerts] == [("gap", "a", 12)]
    assert alerts[0]["value"] == pytest.approx(0.4) and "0.4" in alerts[0]["message"]
    closed = [e for e in events if e["event"] == "stability" and "gap" in e and e["domain"] == "a"]
    assert len(closed) == 1 and closed[0]["step"] == 16 and closed[0]["gap"] == pytest.approx(0.5)


def test_forgetting_alert_for_the_domain_whose_weight_fell_only():
    pl = resolve(*SHIFT)
    a = {10: 2.0, 12: 2.1, 16: 2.1, 24: 2.5}
    b = {10: 2.0, 12: 2.1, 16: 2.1, 24: 2.5}  # b's weight rose: its rise is not forgetting
    alerts = [e for e in feed(GapMonitor(pl, cfg(forgetting_alert=0.3)), rows(a, b)) if e["event"] == "alert"]
    assert [(e["alert"], e["domain"], e["step"]) for e in alerts] == [("forgetting", "a", 24)]


def test_forgetting_alert_at_a_phase_end_inside_the_window():
    # the window (10, 16] reaches the phase end: the loss at the end is still the forgetting to alert on
    pl = resolve(ph("x", 10, {"a": 1.0}), ph("y", 6, {"b": 1.0}))
    alerts = [e for e in feed(GapMonitor(pl, cfg(forgetting_alert=0.3, dense_window=10)),
                              rows({10: 2.0, 12: 2.1, 16: 2.5})) if e["event"] == "alert"]
    assert [(e["alert"], e["domain"], e["step"]) for e in alerts] == [("forgetting", "a", 16)]


def test_recovery_deadline_alert_only_when_never_recovered():
    pl = resolve(*SHIFT)
    late = {10: 2.0, 12: 2.6, 14: 2.5, 20: 2.4}
    alerts = [e for e in feed(GapMonitor(pl, cfg(recovery_deadline=8)), rows(late)) if e["event"] == "alert"]
    assert [(e["alert"], e["domain"], e["step"]) for e in alerts] == [("recovery", "a", 20)]
    # recovered at 14, up again at 20: the deadline was met
    relapse = {10: 2.0, 12: 2.6, 14: 2.1, 20: 2.4}
    alerts = [e for e in feed(GapMonitor(pl, cfg(recovery_deadline=8)), rows(relapse)) if e["event"] == "alert"]
    assert alerts == []
