"""Plan resolution in all three units, and mixtures: stages, exact block counts, upsampling, blends, replay."""

import hashlib
import math

import numpy as np
import pytest

from clt import config, plan
from clt.mixture import MixtureSchedule, largest_remainder, slot_names


def resolve(phases, **top):
    raw = dict(data=dict(domains={"a": "-", "b": "-", "c": "-"}, seq_len=16, block_rows=64), batch_size=8,
               phases=phases)
    raw.update(top)
    return plan.resolve(config.from_dict(raw))


def ph(name, **kw):
    kw.setdefault("mixture", {"a": 1.0})
    kw.setdefault("schedule", dict(kind="constant", peak=1e-3))
    return dict(name=name, **kw)


def test_durations_in_steps_tokens_and_percent():
    pl = resolve((ph("s", steps=10), ph("t", tokens=1000), ph("u", tokens="2K")))
    # tokens -> ceil(tokens / (batch x seq_len)) with 8 x 16 = 128 tokens per step
    assert [p.steps for p in pl.phases] == [10, math.ceil(1000 / 128), math.ceil(2000 / 128)]
    assert [p.start for p in pl.phases] == [0, 10, 18]
    pl = resolve((ph("x", percent=25), ph("y", percent=75)), budget=dict(steps=101))
    assert [p.steps for p in pl.phases] == [round(25.25), round(75.75)]
    pl = resolve((ph("x", percent=50), ph("y", percent=50)), budget=dict(tokens="12800"))
    assert [p.steps for p in pl.phases] == [50, 50]


def test_batch_size_ramp_keeps_rows_global():
    pl = resolve((ph("small", steps=10, batch_size=4), ph("big", steps=5)))
    assert pl.phases[1].row_start == 40
    assert pl.rows_before(12) == 40 + 2 * 8
    assert pl.total_rows == 80


def test_fractions_round_against_the_phase():
    pl = resolve((ph("x", steps=30, schedule=dict(kind="wsd", warmup=0.05, decay=0.15, peak=1e-3),
                     upsample=dict(last=0.1, mixture={"b": 1.0})),))
    seg = pl.phases[0].schedule
    assert (seg.warmup, seg.decay) == (round(1.5), round(4.5))
    assert pl.phases[0].upsample_start == 27


def test_past_phases_keep_their_ranges_on_resume():
    pl = resolve((ph("x", percent=50), ph("y", percent=50)), budget=dict(steps=100))
    edited = config.from_dict(dict(data=dict(domains={"a": "-", "b": "-", "c": "-"}, seq_len=16, block_rows=64),
                                   batch_size=8, budget=dict(steps=200),
                                   phases=(ph("x", percent=50), ph("y", percent=50))))
    again = plan.resolve(edited, past=pl, through_step=10)
    assert again.phases[0] == pl.phases[0]  # ran: pinned
    assert again.phases[1].start == 50 and again.phases[1].steps == 100  # future: re-resolved


def test_largest_remainder_is_exact_and_closest():
    assert largest_remainder(10, np.array([1, 1, 1])).tolist() == [4, 3, 3]
    c = largest_remainder(64, np.array([0.01, 0.5, 0.49]))
    assert c.sum() == 64 and c.tolist() == [1, 32, 31]


def test_every_block_has_exact_counts():
    pl = resolve((ph("x", steps=40, mixture={"a": 0.5, "b": 0.3, "c": 0.2}),))
    mix = MixtureSchedule(pl)
    slots = np.concatenate([mix.rows_at(s)[0] for s in range(40)])
    expected = largest_remainder(64, np.array([0.5, 0.3, 0.2]))
    for blk in range(len(slots) // 64):
        assert np.bincount(slots[blk * 64:(blk + 1) * 64], minlength=3)[:3].tolist() == expected.tolist()


def test_draw_indices_count_each_domains_earlier_draws():
    pl = resolve((ph("x", steps=20, mixture={"a": 0.5, "b": 0.5}), ph("y", steps=20, mixture={"b": 1.0}, replay=0.25)))
    mix = MixtureSchedule(pl)
    seen = {0: [], 1: [], 2: []}
    for s in range(40):
        slots, draws = mix.rows_at(s)
        assert (slots < 6).all()  # no buffer in this plan
        for slot, k in zip(slots, draws):
            seen[int(slot) % 3].append(int(k))  # slot d and replay slot 3 + d share domain d's counter
    for d, ks in seen.items():  # each domain's draws are 0, 1, 2, ... in row order, fresh and replay together
        assert ks == list(range(len(ks)))


def _rows_digest(mix: MixtureSchedule, steps) -> str:
    h = hashlib.sha256()
    for s in steps:
        slots, draws = mix.rows_at(s)
        h.update(slots.astype(np.int64).tobytes())
        h.update(draws.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def test_rows_are_a_pure_function_of_seed_plan_step():
    pl = resolve((ph("x", steps=20, mixture={"a": 0.6, "b": 0.4}), ph("y", steps=10, mixture={"c": 1.0}, replay=0.25)))
    # Pinned: the rows of every step of this plan. A change here changes which example every row of an existing
    # run was, so its resume would train on other data: change the pin only with a clt version that says so.
    assert _rows_digest(MixtureSchedule(pl), range(30)) == "49919df5fde38ddf"
    # No hidden state: asking for the last steps first, on a fresh schedule, gives what walking from 0 gives.
    fresh = MixtureSchedule(pl)
    late = [fresh.rows_at(s) for s in (29, 21, 7)]
    walked = MixtureSchedule(pl)
    rows = [walked.rows_at(s) for s in range(30)]
    for (slots, draws), s in zip(late, (29, 21, 7)):
        np.testing.assert_array_equal(slots, rows[s][0])
        np.testing.assert_array_equal(draws, rows[s][1])
    other = MixtureSchedule(resolve((ph("x", steps=20, mixture={"a": 0.6, "b": 0.4}),), seed=1))
    assert any((other.rows_at(s)[0] != rows[s][0]).any() for s in range(8))


def test_replay_share_is_exact_per_block_even_when_small():
    # 1% replay at batch 32 with blocks of 1024 rows: round(0.01 x 1024) = 10 replayed rows per block.
    raw = dict(data=dict(domains={"a": "-", "b": "-"}, seq_len=16, block_rows=1024), batch_size=32,
               phases=(ph("x", steps=64), ph("y", steps=128, mixture={"b": 1.0}, replay=0.01)))
    pl = plan.resolve(config.from_dict(raw))
    mix = MixtureSchedule(pl)
    slots = np.concatenate([mix.rows_at(s)[0] for s in range(64, 192)])
    for blk in range(len(slots) // 1024):
        block = slots[blk * 1024:(blk + 1) * 1024]
        assert ((block >= 2) & (block < 4)).sum() == 10
        assert (block == 2).sum() == 10  # replay goes to domain a, the only one phase x trained


def test_replay_weights_pro_rata_to_earlier_rows():
    pl = resolve((ph("x", steps=30, mixture={"a": 1.0}), ph("y", steps=10, mixture={"b": 1.0}),
                  ph("z", steps=10, mixture={"c": 1.0}, replay=0.2)))
    # fresh rows before z: a 30 x 8, b 10 x 8 -> 0.75 / 0.25
    assert pl.phases[2].replay_weights == pytest.approx((0.75, 0.25, 0.0))
    pl = resolve((ph("x", steps=30), ph("y", steps=10, mixture={"b": 1.0}, replay=dict(share=0.2, weights={"c": 1}))))
    assert pl.phases[1].replay_weights == (0.0, 0.0, 1.0)


def test_upsampling_switches_the_mixture_at_the_end_of_a_phase():
    pl = resolve((ph("x", steps=20, mixture={"a": 1.0}, upsample=dict(last=0.25, mixture={"b": 1.0})),))
    mix = MixtureSchedule(pl)
    assert set(mix.rows_at(14)[0]) == {0}
    assert set(mix.rows_at(15)[0]) == {1}
    assert pl.switches() == [dict(step=15, kind="upsample", phase="x")]


def test_blend_cross_fades_linearly_and_each_step_is_a_block():
    pl = resolve((ph("x", steps=10, mixture={"a": 1.0}), ph("y", steps=20, mixture={"b": 1.0}, blend_steps=3)))
    mix = MixtureSchedule(pl)
    for t in range(3):
        a = (t + 1) / 4
        np.testing.assert_allclose(mix.weights_at(10 + t)[:2], [1 - a, a])
        slots = mix.rows_at(10 + t)[0]
        assert (slots == 1).sum() == largest_remainder(8, np.array([1 - a, a]))[1]
    np.testing.assert_allclose(mix.weights_at(13)[:2], [0, 1])


def test_replay_holds_through_blends_and_upsampling():
    pl = resolve((ph("x", steps=16, mixture={"a": 1.0}),
                  ph("y", steps=32, mixture={"b": 1.0}, replay=0.25, blend_steps=4,
                     upsample=dict(last=8, mixture={"c": 1.0}))))
    mix = MixtureSchedule(pl)
    names = slot_names(pl.domains)
    for s in range(16, 48):
        w = mix.weights_at(s)
        assert w[3:6].sum() == pytest.approx(0.25), (s, dict(zip(names, w)))
    # over the main part (blocks of 64 = 8 steps) replayed rows are exactly 16 per block
    slots = np.concatenate([mix.rows_at(s)[0] for s in range(20, 36)])
    for blk in range(2):
        assert ((slots[blk * 64:(blk + 1) * 64] >= 3) & (slots[blk * 64:(blk + 1) * 64] < 6)).sum() == 16


def test_row_domains_do_not_depend_on_declaration_order_or_unused_domains():
    """A later config may list the domains in another order and declare new ones: the rows of the past keep
    their domains and draw indices (block layout and remainder ties go by name, not position)."""
    phases = (ph("x", steps=12, mixture={"a": 0.5, "c": 0.5}), ph("y", steps=12, mixture={"c": 1.0}, replay=0.3))

    def named_rows(domains):
        raw = dict(data=dict(domains={d: "-" for d in domains}, seq_len=16, block_rows=64), batch_size=8,
                   phases=phases)
        pl = plan.resolve(config.from_dict(raw))
        mix, D = MixtureSchedule(pl), len(pl.domains)
        return [([pl.domains[x % D] for x in mix.rows_at(s)[0]], mix.rows_at(s)[1].tolist()) for s in range(24)]

    assert named_rows(("a", "c")) == named_rows(("c", "a")) == named_rows(("c", "b", "a"))
