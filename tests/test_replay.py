"""Replay: exact replay shares, an unbiased reservoir, a buffer that survives resume and outlives its data."""

import shutil

import numpy as np
import pytest
from conftest import SMOKE, smoke_overrides

from clt import config, plan, replay, train
from clt.config import ConfigError
from clt.metrics import TIMING_FIELDS, read_jsonl
from clt.mixture import MixtureSchedule


def test_reservoir_keeps_every_row_with_equal_probability():
    """Each of N rows must be kept with probability cap / N. Counts over T independent reservoirs are
    Binomial(T, cap/N); a chi-square over all rows bounds the deviation. A sampler biased towards recent or
    early rows (e.g. j = floor(u x n), or replacing only the first slots) fails this bound by far."""
    N, cap, T = 200, 20, 1500
    kept = np.zeros(N)
    for t in range(T):
        res = replay.Reservoir.empty(cap)
        u = np.random.default_rng([7, t]).random(N)
        res.offer(np.zeros(N, np.int32), np.arange(N), u)
        assert res.fill == cap and len(set(res.draw.tolist())) == cap
        kept[res.draw] += 1
    p = cap / N
    chi2 = (((kept - T * p) ** 2) / (T * p * (1 - p))).sum()
    # chi-square with N - 1 = 199 degrees of freedom: mean 199, sd ~20; 300 is > 5 sd out.
    assert chi2 < 300, chi2
    # early and late halves are kept equally often (a recency-biased sampler fails this)
    assert abs(kept[:N // 2].sum() - kept[N // 2:].sum()) < 0.05 * kept.sum()


def test_vectorised_offer_equals_sequential_algorithm_r():
    def sequential(cap, chunks):
        domain, draw, seen = [-1] * cap, [0] * cap, 0
        for d_arr, k_arr, u_arr in chunks:
            for d, k, x in zip(d_arr, k_arr, u_arr):
                j = seen if seen < cap else int(x * (seen + 1))
                if j < cap:
                    domain[j], draw[j] = d, k
                seen += 1
        return domain, draw

    rng = np.random.default_rng(0)
    chunks = [(rng.integers(0, 3, m), rng.integers(0, 10**6, m), rng.random(m)) for m in (5, 0, 17, 40, 300, 1)]
    res = replay.Reservoir.empty(25)
    for chunk in chunks:
        res.offer(*chunk)
    domain, draw = sequential(25, chunks)
    assert res.domain.tolist() == domain and res.draw.tolist() == draw and res.seen == 363


def test_reservoir_is_a_pure_function_of_the_plan_and_step(demo_data):
    cfg = config.load(str(SMOKE), smoke_overrides(demo_data))
    pl = plan.resolve(cfg)
    a = replay.reservoir_at(pl, 30, 20)
    b = replay.reservoir_at(pl, 30, 20, start=(12, replay.reservoir_at(pl, 30, 12)))
    np.testing.assert_array_equal(a.domain, b.domain)
    np.testing.assert_array_equal(a.draw, b.draw)
    # only fresh rows are offered: the shift phase replays prose 25%, yet fresh prose rows stop at step 12
    fresh_rows = sum(int((MixtureSchedule(pl).rows_at(s)[0] < 2).sum()) for s in range(20))
    assert a.seen == fresh_rows


def buffer_cfg(demo_data, *extra):
    return smoke_overrides(demo_data, "replay_buffer.capacity=40", "phases.anneal.replay={'share': 0.25, "
                                      "'source': 'buffer'}", *extra)


def test_buffer_replay_is_exact_per_block_and_logged(demo_data, tmp_path):
    cfg = config.load(str(SMOKE), buffer_cfg(demo_data, "data.block_rows=8"))  # a block per step
    pl = plan.resolve(cfg)
    mix = MixtureSchedule(pl)
    anneal = pl.phases[2]
    for s in range(anneal.start, anneal.end):
        assert (mix.rows_at(s)[0] == 2 * len(pl.domains)).sum() == 2  # round(0.25 x 8), every block
    slots = np.concatenate([mix.rows_at(s)[0] for s in range(anneal.start, anneal.end)])
    assert (slots >= 2).sum() == (slots == 4).sum()  # no mixture replay in that phase
    train.train(cfg, str(tmp_path), progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("phase") == "anneal" and "loss" in r]
    assert sum(r.get("rows/replay/buffer", 0) for r in rows) == (slots == 4).sum()
    snap = replay.BufferSnapshot(tmp_path / "replay" / f"step-{anneal.start}")
    assert snap.fill == 40 and set(snap.composition()) == {"code", "prose"}


def test_buffer_survives_resume_bit_exactly(demo_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = config.load(str(SMOKE), buffer_cfg(demo_data))
    train.train(cfg, str(straight), progress=False)
    train.train(config.load(str(SMOKE), buffer_cfg(demo_data, "debug.preempt_at_step=25")), str(resumed),
                progress=False)
    shutil.rmtree(resumed / "replay")  # snapshots are recomputed from (seed, plan, step) on resume
    train.train(cfg, str(resumed), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]  # noqa: E731
    assert strip(read_jsonl(straight / "metrics.jsonl")) == strip(read_jsonl(resumed / "metrics.jsonl"))
    for step in (22, 28):
        a, b = (replay.BufferSnapshot(w / "replay" / f"step-{step}") for w in (straight, resumed))
        assert np.asarray(a.tokens).tobytes() == np.asarray(b.tokens).tobytes()
        np.testing.assert_array_equal(a.draw, b.draw)


def test_buffer_replay_works_after_the_old_domain_is_deleted(demo_data, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    domains = {"prose": str(data / "prose"), "code": str(data / "code")}
    base = dict(name="base", steps=10, mixture={"prose": 1.0}, schedule=dict(kind="cosine", warmup=2, peak=3e-3))
    raw = dict(seed=0, model=dict(preset="tiny"), batch_size=8, replay_buffer=dict(capacity=32),
               data=dict(domains=domains, seq_len=32, block_rows=64, eval_sequences=8, eval_batch=8),
               monitor=dict(every=5, dense_every=2, dense_window=4), phases=(base,))
    wd = tmp_path / "run"
    train.train(config.from_dict(raw), str(wd), progress=False)  # month 1: prose; buffer materialised at 10
    shutil.rmtree(data / "prose")  # last year's corpus is no longer kept
    raw["phases"] = (base, dict(name="code", steps=8, mixture={"code": 1.0},
                                replay=dict(share=0.25, source="buffer"),
                                schedule=dict(kind="cosine", warmup=2, peak=2e-3)))
    with caplog.at_level("WARNING", logger="clt"):
        result = train.train(config.from_dict(raw), str(wd), progress=False)
    assert result["final_step"] == 18
    assert f"data.domains.prose: no prepared data at {data / 'prose'}: not evaluated" in caplog.text
    rows = [r for r in read_jsonl(wd / "metrics.jsonl") if r.get("phase") == "code" and "loss" in r]
    assert sum(r.get("rows/replay/buffer", 0) for r in rows) == round(0.25 * 64)
    snap = replay.BufferSnapshot(wd / "replay" / "step-18")  # prose entries carried over without their data
    assert snap.composition()["prose"] > 0


def test_export_info_and_load_into_a_new_run(demo_data, tmp_path, capsys):
    from clt.cli import main

    wd = tmp_path / "run"
    train.train(config.load(str(SMOKE), smoke_overrides(demo_data, "replay_buffer.capacity=24")), str(wd),
                progress=False)
    assert main(["replay", "export", str(wd), str(tmp_path / "buf")]) == 0
    assert main(["replay", "info", str(tmp_path / "buf")]) == 0
    out = capsys.readouterr().out
    assert "24/24 sequences" in out and "prose" in out and "code" in out
    assert main(["replay", "info", str(wd)]) == 0
    buffer, step = replay.buffer_of_workdir(wd)  # what the CLI calls: the buffer at the latest checkpoint
    assert step == 28 and buffer.capacity == 24 and buffer.snapshot_steps()[-1] == 28
    with pytest.raises(ConfigError, match="already exists"):
        replay.export(wd, tmp_path / "buf")
    # a new run replays the exported buffer from its first phase (continual pre-training from init_from)
    new = config.load(str(SMOKE), smoke_overrides(
        demo_data, f"replay_buffer.load={str(tmp_path / 'buf')!r}", "phases.base.replay={'share': 0.25, "
        "'source': 'buffer'}", "debug.preempt_at_step=4"))
    train.train(new, str(tmp_path / "new"), init_from=f"ckpt:{wd}", progress=False)
    rows = [r for r in read_jsonl(tmp_path / "new" / "metrics.jsonl") if "loss" in r]
    assert sum(r.get("rows/replay/buffer", 0) for r in rows) > 0


def test_info_on_a_run_without_buffer_says_so(demo_data, tmp_path, capsys):
    from clt.cli import main

    wd = tmp_path / "run"
    train.train(config.load(str(SMOKE), smoke_overrides(demo_data, "debug.preempt_at_step=2")), str(wd),
                progress=False)
    assert main(["replay", "info", str(wd)]) == 0
    assert "keeps no replay buffer" in capsys.readouterr().out
    assert replay.buffer_of_workdir(wd) is None and replay.export(wd, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


def test_bad_replay_inputs_are_clear_errors(demo_data, tmp_path):
    with pytest.raises(ConfigError, match=r"phases\.base\.replay\.source.*first phase has no buffer"):
        config.load(str(SMOKE), smoke_overrides(demo_data, "replay_buffer.capacity=8",
                                                        "phases.base.replay={'share': 0.1, 'source': 'buffer'}"))
    with pytest.raises(ConfigError, match=r"no replay buffer is configured"):
        config.load(str(SMOKE), smoke_overrides(demo_data, "phases.shift.replay={'share': 0.1, "
                                                                   "'source': 'buffer'}"))
    with pytest.raises(ConfigError, match=r"replay share must be in \[0, 1\)"):
        config.load(str(SMOKE), smoke_overrides(demo_data, "phases.shift.replay=-0.1"))
    wd = tmp_path / "run"
    train.train(config.load(str(SMOKE), smoke_overrides(demo_data, "replay_buffer.capacity=8",
                                                                "debug.preempt_at_step=2")), str(wd), progress=False)
    from clt.cli import main

    assert main(["replay", "export", str(wd), str(tmp_path / "buf")]) == 0
    other = config.load(str(SMOKE), smoke_overrides(
        demo_data, "data.seq_len=16", f"replay_buffer.load={str(tmp_path / 'buf')!r}",
        "phases.base.replay={'share': 0.25, 'source': 'buffer'}"))
    with pytest.raises(ConfigError, match=r"buffer sequences have seq_len 32, the run uses 16"):
        train.train(other, str(tmp_path / "other"), progress=False)

