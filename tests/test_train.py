"""The trainer: deterministic batches, a loss that falls, sharded state, optimizer policies at a switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_overrides
from flax import nnx

from clt import config, plan, sharding, train
from clt.data.pipeline import BatchSource, iterate
from clt.data.shards import DomainData
from clt.metrics import read_jsonl
from clt.optim import make_optimizer


@pytest.fixture(scope="session")
def smoke_run(demo_data, tmp_path_factory):
    """One uninterrupted smoke run that several tests read."""
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    wd = tmp_path_factory.mktemp("smoke")
    result = train.train(cfg, str(wd), progress=False)
    return cfg, wd, result


def source_for(cfg):
    return BatchSource(plan.resolve(cfg), {d: DomainData(p) for d, p in cfg.data.domains})


def test_batch_is_a_pure_function_of_step(demo_data):
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    a, b = source_for(cfg), source_for(cfg)
    for s in (0, 5, 13, 27):
        np.testing.assert_array_equal(a.batch(s)["tokens"], b.batch(s)["tokens"])
    # skipping to step s gives the batch an uninterrupted iterator reaches at s
    from_start = dict(iterate(a, 0, 20, prefetch=2))
    from_s = dict(iterate(b, 13, 20, prefetch=2))
    for s in range(13, 20):
        np.testing.assert_array_equal(from_start[s]["tokens"], from_s[s]["tokens"])


def test_host_slices_partition_the_global_batch(demo_data):
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    pl = plan.resolve(cfg)
    data = {d: DomainData(p) for d, p in cfg.data.domains}
    whole = BatchSource(pl, data).batch(14)["tokens"]
    halves = [BatchSource(pl, data, host=h, hosts=2).batch(14)["tokens"] for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_rows_come_from_the_domains_the_mixture_says(demo_data):
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    src = source_for(cfg)
    prose = DomainData(demo_data / "prose").train
    batch = src.batch(0)  # phase "base" is all prose: every row must be a prose sequence
    seq_len = cfg.data.seq_len
    all_prose = prose.sequences(np.arange(prose.num_sequences(seq_len)), seq_len)
    for row in batch["tokens"]:
        assert (all_prose == row).all(axis=1).any()


def sharded_step(cfg, mesh):
    """(batch source, fresh sharded state, jitted step, optimizer, state shardings) built as clt train does."""
    data = {d: DomainData(p) for d, p in cfg.data.domains}
    pl = plan.resolve(cfg)
    tx = make_optimizer(cfg.optim)
    graphdef, params, _, state_sh = train.state_layout(train.model_dims(cfg, data), mesh, tx, seed=0,
                                                       dtype=jnp.float32)
    step = train.compile_step(graphdef, tx, pl, cfg.optim, state_sh, sharding.batch_sharding(mesh),
                              sharding.replicated(mesh))
    return BatchSource(pl, data), train.init_state(params, tx, state_sh), step, tx, state_sh


def test_same_losses_on_one_and_eight_devices(demo_data, tmp_path):
    losses = {}
    for n in (1, 8):
        cfg = config.load("configs/smoke.py", smoke_overrides(demo_data, "phases.0.steps=4", "phases.1.steps=3",
                                                              "phases.2.steps=2", "log.every=1"))
        mesh = sharding.make_mesh(config.MeshConfig(data=-1), jax.devices()[:n])
        src, state, step, _, _ = sharded_step(cfg, mesh)
        out = []
        with sharding.use_mesh(mesh):
            for s in range(4):
                batch = jax.device_put(src.batch(s)["tokens"], sharding.batch_sharding(mesh))
                state, m = step(state, batch)
                out.append(float(m["loss"]))
        losses[n] = out
    np.testing.assert_allclose(losses[1], losses[8], rtol=1e-5)


def test_loss_falls_and_metrics_are_logged(smoke_run):
    cfg, wd, result = smoke_run
    rows = read_jsonl(wd / "metrics.jsonl")
    evals = [r for r in rows if "eval/prose/loss" in r]
    # prose is trained in "base" (steps 0-12): its eval loss falls there
    start, base_end = evals[0], next(r for r in evals if r["step"] == 12)
    assert base_end["eval/prose/loss"] < start["eval/prose/loss"] - 0.5
    # code is trained in "shift" (12-22): its eval loss falls there
    shift_end = next(r for r in evals if r["step"] == 22)
    assert shift_end["eval/code/loss"] < base_end["eval/code/loss"]
    train_rows = [r for r in rows if "loss" in r]
    assert all({"step", "phase", "lr", "tokens_per_s"} <= r.keys() for r in train_rows)
    assert all(np.isfinite(r["eval/code/bpb"]) and r["eval/code/bpb"] > 0 for r in evals)
    # replayed rows are logged apart from fresh ones during the shift phase
    shift_rows = [r for r in train_rows if r["phase"] == "shift"]
    assert sum(r.get("rows/replay/prose", 0) for r in shift_rows) > 0
    assert all(r.get("rows/prose", 0) == 0 for r in shift_rows)
    assert result["final_step"] == 28
    assert (wd / "plan.json").exists()


def test_params_are_sharded_by_the_rules_in_the_train_state():
    mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
    from clt.model import resolve_dims

    dims = resolve_dims(config.ModelConfig(preset="tiny"), 256)
    _, _, _, state_sh = train.state_layout(dims, mesh, make_optimizer(config.OptimConfig()), seed=0,
                                           dtype=jnp.float32)
    embed_sh = jax.tree.leaves(state_sh["params"]["embed"])[0]
    assert embed_sh.spec == jax.P("tensor", "fsdp")
    # Adam's first moment of the embedding shards like the embedding itself
    mu = jax.tree.leaves(state_sh["opt_state"].inner_state)
    assert any(getattr(s, "spec", None) == jax.P("tensor", "fsdp") for s in mu)


def test_reset_starts_a_fresh_optimizer_state_and_keep_carries_it(demo_data):
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    mesh = sharding.make_mesh(config.MeshConfig(data=-1))
    src, state, step, tx, state_sh = sharded_step(cfg, mesh)
    with sharding.use_mesh(mesh):
        for s in range(3):
            state, _ = step(state, jax.device_put(src.batch(s)["tokens"], sharding.batch_sharding(mesh)))
    moments = lambda st: [np.asarray(x) for x in jax.tree.leaves(st["opt_state"].inner_state)]  # noqa: E731
    before = moments(state)
    assert any(np.abs(m).sum() > 0 for m in before)
    reset = train.reset_optimizer(state, tx, state_sh)
    assert all(np.abs(m).sum() == 0 for m in moments(reset))  # fresh moments and count
    assert int(reset["step"]) == 3  # the step (and params) are untouched
    for a, b in zip(jax.tree.leaves(reset["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # "keep" is the absence of a reset: moments flow into the next update unchanged
    for a, b in zip(moments(state), before):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_skips_the_update(demo_data):
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data))
    mesh = sharding.make_mesh(config.MeshConfig(data=-1))
    pl = plan.resolve(cfg)
    dims = train.model_dims(cfg, {d: DomainData(p) for d, p in cfg.data.domains})
    graphdef, params = nnx.split(sharding.create_model(dims, mesh, seed=0, dtype=jnp.float32))
    params = jax.tree.map(lambda x: x * jnp.nan if x.ndim == 1 else x, params)  # NaN norm scales -> NaN loss
    tx = make_optimizer(cfg.optim)
    state = train.new_state(params, tx)
    tokens = jnp.asarray(source_for(cfg).batch(0)["tokens"])
    with sharding.use_mesh(mesh):
        new, m = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, plan=pl, optim=cfg.optim))(
            state, tokens)
    assert bool(m["skipped"]) and int(new["skips"]) == 1 and int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves(new["opt_state"]), jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

