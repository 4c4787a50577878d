"""Honest throughput: tokens/s and MFU count train steps only, and logging never drains the device queue."""

from __future__ import annotations

import jax
import pytest
from conftest import smoke_config

from clt import monitor, plan, step, train
from clt.metrics import PEAK_FLOPS, StepClock, mfu, peak_flops, read_jsonl


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_clock_sets_eval_checkpoint_and_compile_time_aside():
    now = FakeTime()
    clock = StepClock(now)
    with clock.aside("compile"):
        now.t += 30.0
    clock.restart()
    for _ in range(4):  # four steps of 2 s, with an eval of 10 s and a save of 5 s in between
        clock.add(256)
        now.t += 2.0
        if _ == 1:
            with clock.aside("eval"):
                now.t += 10.0
            with clock.aside("checkpoint"):
                now.t += 5.0
    row = clock.interval(*clock.cut())
    assert row == dict(tokens_per_s=4 * 256 / 8.0, step_s=2.0)
    clock.add(256)  # the next interval starts where the last one's metrics arrived
    now.t += 3.0
    assert clock.interval(*clock.cut()) == dict(tokens_per_s=256 / 3.0, step_s=3.0)
    assert clock.summary() == dict(train_s=11.0, compile_s=30.0, eval_s=10.0, checkpoint_s=5.0)


def test_the_peak_table_matches_device_kinds_most_specific_first():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12 and peak_flops("TPU v4") == 275e12
    assert peak_flops("cpu") is None
    names = [k for k, _ in PEAK_FLOPS]
    for i, name in enumerate(names):  # no entry is shadowed by an earlier, less specific one
        assert not any(earlier in name for earlier in names[:i]), name
    assert mfu(1000.0, 6e9, 989e12, 8) == pytest.approx(1000 * 6e9 / (989e12 * 8))


def test_a_step_is_logged_after_the_next_one_is_dispatched(demo_data, tmp_path, monkeypatch):
    """The loop reads step s's metrics after queueing step s+1, except right before an eval, a save or a phase
    end, which wait for the device anyway. Every train row reports tokens/s and seconds per step of the train
    steps alone: tokens_per_s x step_s is exactly the tokens of one step; the row of the first step alone, whose
    time is the compile's, reports none."""
    order: list[tuple[str, int]] = []
    compile_step = step.compile_step

    def recording_compile(*args, **kwargs):
        fn = compile_step(*args, **kwargs)

        def dispatch(state, batch):
            order.append(("dispatch", sum(1 for e in order if e[0] == "dispatch")))
            return fn(state, batch)
        return dispatch

    device_get = jax.device_get

    def recording_get(x):
        if isinstance(x, dict) and "skips" in x:  # the step's metrics
            order.append(("fetch", sum(1 for e in order if e[0] == "dispatch")))
        return device_get(x)

    monkeypatch.setattr(step, "compile_step", recording_compile)
    monkeypatch.setattr(jax, "device_get", recording_get)
    cfg = smoke_config(demo_data, "checkpoint.every=0", "log.every=1")  # a row per step: the first is the compile's
    train.train(cfg, str(tmp_path), progress=False)

    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    fetches = [n for kind, n in order if kind == "fetch"]
    assert len(fetches) == len(rows)
    resolved = plan.resolve(cfg)
    syncs = set(monitor.eval_steps(resolved, cfg.monitor)) | {p.end for p in resolved.phases}
    deferred = 0
    for row, dispatched in zip(rows, fetches):
        done = row["step"] + 1
        if done in syncs:
            assert dispatched == done, row["step"]  # read before the eval, save or phase end
        else:
            assert dispatched == done + 1, row["step"]  # read with step done+1 already queued
            deferred += 1
    assert deferred >= 3
    assert "tokens_per_s" not in rows[0] and "step_s" not in rows[0]  # step 0 alone: its time is the compile's
    assert all(r["tokens_per_s"] * r["step_s"] == pytest.approx(cfg.batch_size * cfg.data.seq_len) for r in rows[1:])
    finished = next(e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "finished")
    assert set(finished["time"]) == {"train_s", "compile_s", "eval_s", "checkpoint_s"}
    assert all(v > 0 for v in finished["time"].values()), finished["time"]  # each kind measured (phase-end saves)
