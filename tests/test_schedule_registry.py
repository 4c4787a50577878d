"""The registry of schedule kinds: a kind added by one entry works everywhere; plans and digests stay put."""

import ast
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from clt import config, plan, schedule
from clt.config import ConfigError
from clt.mixture import MixtureSchedule
from clt.schedule import Kind, lr_at

ROOT = pathlib.Path(__file__).resolve().parent.parent


def exponential(xp, s, c):
    """peak * (end / peak) ** ((t - W) / (T - W)) after the warmup."""
    decayed = s.peak * (s.end / s.peak) ** ((c.t - s.warmup) / xp.maximum(c.T - s.warmup, 1))
    return xp.where(c.t < s.warmup, schedule.warmup(xp, c.t, s.warmup, s.peak), decayed)


EXPONENTIAL = Kind("exponential decay from peak to end", reads=("warmup", "end"), lengths=("warmup",),
                   lr=exponential, problems=lambda s: [("end", "an exponential decay needs end > 0", "set end > 0")]
                   if s.end <= 0 else [])


def one_phase(**sched):
    raw = dict(data=dict(domains={"a": "-"}, seq_len=8), batch_size=4,
               phases=(dict(name="p", steps=100, mixture={"a": 1.0}, schedule=sched),))
    return config.from_dict(raw)


def test_a_kind_added_by_one_registry_entry_validates_resolves_and_runs(monkeypatch):
    monkeypatch.setitem(schedule.KINDS, "exponential", EXPONENTIAL)
    cfg = one_phase(kind="exponential", warmup=0.1, peak=1e-3, end=1e-5, decay=0.3)
    seg = plan.resolve(cfg).phases[0].schedule
    assert (seg.kind, seg.warmup, seg.decay, seg.chain_start) == ("exponential", 10, 0, 0)  # decay: not read
    pl = plan.resolve(cfg)
    for step in (0, 5, 10, 40, 99):
        want = 1e-3 * step / 10 if step < 10 else 1e-3 * (1e-5 / 1e-3) ** ((step - 10) / 90)
        assert float(lr_at(pl, step)) == pytest.approx(want, rel=1e-5)
    assert float(lr_at(pl, 100)) == 0.0  # past the plan
    assert schedule.describe(seg) == "exponential peak=0.001 warmup=10 end=1e-05"
    assert schedule.describe(seg, short=True) == "exponential 1e-3->1e-5 w10"
    assert seg.defining() == {"kind": "exponential", "peak": 1e-3, "warmup": 10, "end": 1e-5}
    with pytest.raises(ConfigError, match=r"^phases\.p\.schedule\.end = 0\.0: an exponential decay needs end > 0"):
        one_phase(kind="exponential", peak=1e-3, end=0.0)
    with pytest.raises(ConfigError, match=r"^phases\.p\.schedule\.warmup = 100\.0: warmup \(100 steps\) must be "):
        plan.resolve(one_phase(kind="exponential", warmup=100, peak=1e-3, end=1e-5))


def test_unknown_kind_names_the_field_and_the_registered_kinds():
    with pytest.raises(ConfigError, match=r"^phases\.p\.schedule\.kind = 'exponential': unknown schedule kind; "
                                          r"use one of constant, linear, cosine, .*, power or a preset name"):
        one_phase(kind="exponential", peak=1e-3, end=1e-5)


def test_a_kind_entry_must_name_schedule_fields():
    with pytest.raises(ValueError, match="'steepness', which is no Schedule field"):
        Kind("x", reads=("steepness",), lengths=(), lr=exponential)
    with pytest.raises(ValueError, match="length 'cooldown' is not among the fields the kind reads"):
        Kind("x", reads=("warmup",), lengths=("warmup", "cooldown"), lr=exponential)


def test_chain_start_is_set_by_the_plan_not_the_config():
    with pytest.raises(ConfigError, match=r"schedule\.chain_start = 5: unknown field"):
        one_phase(kind="cosine", chain_start=5)
    assert "chain_start" not in one_phase(kind="cosine").to_dict()["phases"][0]["schedule"]


def test_schedule_is_the_bottom_of_the_package_and_imports_no_jax():
    tree = ast.parse((ROOT / "clt" / "schedule.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [m for m in imported if m == "clt" or m.startswith("clt.")], imported
    proc = subprocess.run([sys.executable, "-c", "import sys, clt.plan, clt.mixture, clt.schedule; "
                           "print('jax' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "False", proc.stderr


def pinned_raw():
    return dict(data=dict(domains={"a": "-", "b": "-"}, seq_len=16, block_rows=32), batch_size=8, phases=(
        dict(name="t1", steps=40, mixture={"a": 1.0}, upsample=dict(last=0.25, mixture={"a": 0.5, "b": 0.5}),
             schedule=dict(kind="infinite", warmup=4, peak=1e-3, const=5e-4, end=1e-5, cooldown=0.5)),
        dict(name="t2", steps=30, batch_size=4, mixture={"b": 1.0}, blend_steps=5, replay=0.25,
             schedule=dict(kind="infinite", warmup=4, peak=1e-3, const=5e-4, end=1e-5, cooldown=0.5, anneal=6,
                           branch=True)),
        dict(name="t3", steps=20, mixture={"a": 0.3, "b": 0.7}, blend_steps=2, replay=0.1,
             schedule=dict(kind="wsd", warmup=0.1, peak=5e-4, end=1e-5, decay=0.2)),
    ))


def test_plan_digests_do_not_move():
    # Digests written by clt before the registry (plan.json and replay snapshots record them).
    assert plan.resolve(config.load(str(ROOT / "configs" / "demo.py"))).digest() == "8d540c47e04d9866"
    pl = plan.resolve(config.from_dict(pinned_raw()))
    assert pl.digest() == "5b007bf0e4ccfa87"
    assert pl.phases[1].replay_weights == (0.875, 0.125)
    assert pl.phases[2].replay_weights == (0.6920731707317073, 0.3079268292682927)
    assert plan.Plan.from_json(json.loads(json.dumps(pl.to_json()))) == pl


def test_pro_rata_replay_weights_are_the_fresh_rows_of_the_mixture_stages():
    pl = plan.resolve(config.from_dict(pinned_raw()))
    for i in (1, 2):
        earlier = plan.Plan(pl.domains, pl.seq_len, pl.seed, pl.block_rows, pl.phases[:i])
        fresh = np.zeros(len(pl.domains))
        for stage in MixtureSchedule(earlier).stages:  # the stages the data pipeline draws rows from
            fresh += stage.weights[:len(pl.domains)] * (stage.row_end - stage.row_start)
        assert pl.phases[i].replay_weights == tuple(float(x) for x in fresh / fresh.sum())
