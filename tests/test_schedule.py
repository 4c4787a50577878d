"""Every schedule against its closed form at its boundaries: first step, end of warmup, start of decay, last."""

import math

import jax
import numpy as np
import pytest

from clt import config, plan
from clt.schedule import lr_at


def one_phase(steps=100, batch=4, seq_len=8, **sched):
    raw = dict(data=dict(domains={"a": "-"}, seq_len=seq_len), batch_size=batch,
               phases=(dict(name="p", steps=steps, mixture={"a": 1.0}, schedule=sched),))
    return plan.resolve(config.from_dict(raw))


def lr(pl, step):
    return float(lr_at(pl, step))


def close(a, b):
    assert a == pytest.approx(b, rel=1e-5, abs=1e-10)


def test_cosine_boundaries():
    pl = one_phase(kind="cosine", warmup=10, peak=1e-3, end=1e-4)
    T, W = 100, 10
    close(lr(pl, 0), 0.0)
    close(lr(pl, 5), 1e-3 * 5 / 10)
    close(lr(pl, W), 1e-3)  # end of warmup = start of decay: the peak
    close(lr(pl, T - 1), 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (T - 1 - W) / (T - W))))
    assert lr(pl, T - 1) > 1e-4  # just above the floor
    close(lr(pl, 55), 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 45 / 90)))


def test_linear_boundaries():
    pl = one_phase(kind="linear", warmup=20, peak=2e-3, end=0.0)
    close(lr(pl, 0), 0.0)
    close(lr(pl, 20), 2e-3)
    close(lr(pl, 99), 2e-3 - 2e-3 * 79 / 80)


def test_constant_and_warmup_fraction():
    pl = one_phase(kind="constant", warmup=0.1, peak=5e-4)  # 0.1 x 100 steps = 10 warmup steps
    assert pl.phases[0].schedule.warmup == 10
    close(lr(pl, 9), 5e-4 * 9 / 10)
    close(lr(pl, 10), 5e-4)
    close(lr(pl, 99), 5e-4)


def test_inverse_sqrt_boundaries():
    pl = one_phase(kind="inverse_sqrt", warmup=16, peak=1e-3)
    close(lr(pl, 8), 1e-3 * 8 / 16)
    close(lr(pl, 16), 1e-3)
    close(lr(pl, 64), 1e-3 * math.sqrt(16 / 64))
    close(lr(pl, 99), 1e-3 * math.sqrt(16 / 99))


@pytest.mark.parametrize("shape,frac", [("linear", lambda u: u), ("cosine", lambda u: 0.5 * (1 - math.cos(math.pi * u))),
                                        ("1-sqrt", lambda u: math.sqrt(u))])
def test_wsd_boundaries(shape, frac):
    pl = one_phase(kind="wsd", warmup=10, peak=1e-3, end=1e-5, decay=0.2, shape=shape)
    T, D = 100, 20
    close(lr(pl, 0), 0.0)
    close(lr(pl, 10), 1e-3)
    close(lr(pl, T - D - 1), 1e-3)  # last stable step
    close(lr(pl, T - D), 1e-3)  # decay starts at u = 0
    u_last = (D - 1) / D
    close(lr(pl, T - 1), 1e-3 - (1e-3 - 1e-5) * frac(u_last))
    close(lr(pl, T - 10), 1e-3 - (1e-3 - 1e-5) * frac(10 / 20))


def infinite_plan(shape="cosine", anneal_shape="exponential"):
    raw = dict(data=dict(domains={"a": "-"}, seq_len=8), batch_size=4, phases=(
        dict(name="t1", steps=100, mixture={"a": 1.0},
             schedule=dict(kind="infinite", warmup=10, peak=1e-3, const=5e-4, end=1e-5, cooldown=40, shape=shape,
                           alpha=2.0)),
        dict(name="t2", steps=50, mixture={"a": 1.0},
             schedule=dict(kind="infinite", warmup=10, peak=1e-3, const=5e-4, end=1e-5, cooldown=40, anneal=10,
                           shape=shape, anneal_shape=anneal_shape, alpha=2.0)),
    ))
    return plan.resolve(config.from_dict(raw))


def test_infinite_cosine_spans_phases_without_rewarm():
    pl = infinite_plan()
    close(lr(pl, 0), 0.0)
    close(lr(pl, 10), 1e-3)  # cooldown starts at the peak
    close(lr(pl, 30), 5e-4 + 0.5 * 5e-4 * (1 + math.cos(math.pi * 20 / 40)))
    close(lr(pl, 50), 5e-4)  # cooldown done: constant
    close(lr(pl, 100), 5e-4)  # second phase: no re-warm, still constant
    close(lr(pl, 139), 5e-4)
    close(lr(pl, 140), 5e-4)  # anneal s = 0
    close(lr(pl, 149), 5e-4 * (1e-5 / 5e-4) ** (9 / 10))  # last step, just above end
    assert pl.phases[1].schedule.chain_start == 0


def test_infinite_inverse_sqrt_cooldown_and_linear_anneal():
    pl = infinite_plan(shape="inverse_sqrt", anneal_shape="linear")
    h = lambda x: 1 / math.sqrt(1 + 2.0 * x) - 1  # noqa: E731
    close(lr(pl, 10), 1e-3)
    close(lr(pl, 30), 1e-3 + (5e-4 - 1e-3) * h(0.5) / h(1.0))
    close(lr(pl, 50), 5e-4)
    close(lr(pl, 145), 5e-4 + (1e-5 - 5e-4) * 5 / 10)


def test_power_schedule():
    B, L = 4, 8
    pl = one_phase(steps=100, batch=B, seq_len=L, kind="power", warmup=10, peak=0.02, a=4.0, b=-0.51, decay=0.2,
                   end=1e-5)
    eta = lambda n: min(0.02, B * 4.0 * n ** -0.51)  # noqa: E731
    tokens = lambda t: t * B * L  # noqa: E731
    close(lr(pl, 5), eta(tokens(10)) * 5 / 10)
    close(lr(pl, 50), eta(tokens(50)))
    close(lr(pl, 80), eta(tokens(80)))  # decay start
    close(lr(pl, 99), eta(tokens(80)) * (1e-5 / eta(tokens(80))) ** (19 / 20))


def test_rewarm_in_later_phase_starts_at_phase_start():
    raw = dict(data=dict(domains={"a": "-"}, seq_len=8), batch_size=4, phases=(
        dict(name="p1", steps=50, mixture={"a": 1.0}, schedule=dict(kind="cosine", warmup=5, peak=1e-3, end=1e-4)),
        dict(name="p2", steps=50, mixture={"a": 1.0}, schedule=dict(kind="cosine", warmup=10, peak=5e-4, end=0.0)),
    ))
    pl = plan.resolve(config.from_dict(raw))
    close(lr(pl, 49), 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 44 / 45)))
    close(lr(pl, 50), 0.0)  # the re-warm starts from 0 at the switch
    close(lr(pl, 55), 5e-4 * 5 / 10)
    close(lr(pl, 60), 5e-4)
    assert lr(pl, 100) == 0.0  # past the plan


def test_lr_at_is_jit_traceable_and_vectorised():
    pl = one_phase(kind="wsd", warmup=10, peak=1e-3, end=0.0, decay=0.2, shape="1-sqrt")
    jitted = jax.jit(lambda s: lr_at(pl, s))
    steps = np.arange(100)
    np.testing.assert_allclose(np.asarray(jax.vmap(jitted)(steps)), np.asarray(lr_at(pl, steps)), rtol=1e-5)
    assert float(jitted(55)) == pytest.approx(lr(pl, 55))


def test_shape_defaults_follow_the_kind():
    assert one_phase(kind="wsd", peak=1e-3, decay=0.2).phases[0].schedule.shape == "1-sqrt"
    pl = one_phase(kind="infinite", warmup=5, peak=1e-3, const=5e-4, cooldown=20)  # no shape given
    assert pl.phases[0].schedule.shape == "cosine"
    close(lr(pl, 15), 5e-4 + 0.5 * 5e-4 * (1 + math.cos(math.pi * 10 / 20)))
