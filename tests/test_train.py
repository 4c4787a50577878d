"""The trainer: deterministic batches, a loss that falls, sharded state, the optimizer reset at a switch, skipped
updates. The step's numerics (against independent computations, on other meshes) are in test_step.py."""

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from conftest import smoke_config
from flax import nnx

from clt import config, plan, sharding
from clt import step as step_lib
from clt.data.pipeline import BatchSource, example_index, iterate
from clt.data.shards import DomainData
from clt.metrics import read_jsonl
from clt.mixture import MixtureSchedule
from clt.optim import make_optimizer


# ----------------------------------------------------------------------------------------------------------
# The train state and step of clt.step, built as `clt train` builds them. Only these helpers touch its API.
# ----------------------------------------------------------------------------------------------------------
def sharded_step(cfg, mesh):
    """(batch source, fresh sharded state, jitted step, optimizer, state shardings) built as clt train does."""
    data = {d: DomainData(p) for d, p in cfg.data.domains}
    pl = plan.resolve(cfg)
    tx = make_optimizer(cfg.optim)
    graphdef, params, _, state_sh = step_lib.state_layout(model_dims(cfg, data), mesh, tx, seed=0,
                                                          dtype=jnp.float32)
    step = step_lib.compile_step(graphdef, tx, pl, cfg.optim, state_sh, sharding.batch_sharding(mesh),
                                 sharding.replicated(mesh))
    return BatchSource(pl, data), step_lib.init_state(params, tx, state_sh), step, tx, state_sh


def state_shardings(dims, mesh):
    return step_lib.state_layout(dims, mesh, make_optimizer(config.OptimConfig()), seed=0, dtype=jnp.float32)[3]


def reset_optimizer(state, tx, state_sh):
    return step_lib.reset_optimizer(state, tx, state_sh)


def seed_model(cfg, mesh):
    """(graphdef, params) of the seed-0 model, created into its shards on `mesh`."""
    dims = model_dims(cfg, {d: DomainData(p) for d, p in cfg.data.domains})
    return nnx.split(step_lib.create_model(dims, mesh, seed=0, dtype=jnp.float32))


def plain_step(cfg, graphdef, params):
    """(fresh train state around `params`, the jitted step) without layouts, for params edited by hand."""
    tx = make_optimizer(cfg.optim)
    step = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, plan=plan.resolve(cfg), optim=cfg.optim)
    return step_lib.new_state(params, tx), jax.jit(step)


def get(state, name):
    """A field of the train state: params, opt_state, step, loss_ema, ema_count, skips, skipped."""
    return getattr(state, name)


def model_dims(cfg, data):
    """The run's model dims, from the data's vocabulary (as `clt train` computes them)."""
    return step_lib.model_dims(cfg, max(d.vocab_size for d in data.values()))


# ----------------------------------------------------------------------------------------------------------
def source_for(cfg):
    return BatchSource(plan.resolve(cfg), {d: DomainData(p) for d, p in cfg.data.domains})


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:16]


def test_batch_is_a_pure_function_of_step(demo_data):
    """No hidden state: a fresh source asked for steps out of order gives the batches of one that walked every
    step from 0, and an iterator started at 13 gives the batches an iterator from 0 reaches there."""
    cfg = smoke_config(demo_data)
    walked = source_for(cfg)
    seen = {s: walked.batch(s)["tokens"] for s in range(28)}
    fresh = source_for(cfg)
    for s in (27, 13, 14, 0, 27):
        np.testing.assert_array_equal(fresh.batch(s)["tokens"], seen[s])
    assert len({seen[s].tobytes() for s in seen}) == 28  # and the steps' batches differ
    from_s = dict(iterate(source_for(cfg), 13, 20, prefetch=2))
    assert sorted(from_s) == list(range(13, 20))
    for s in range(13, 20):
        np.testing.assert_array_equal(from_s[s]["tokens"], seen[s])


def test_data_order_is_pinned(demo_data):
    """The smoke plan's row assignment (slot, draw index per row) and the draw -> example permutation are pinned:
    a change of data order (mixture, shuffle, seed handling) fails here, on any machine (neither depends on the
    demo text, which comes from the Python install). And a batch row is exactly the pinned example's tokens."""
    cfg = smoke_config(demo_data)
    pl = plan.resolve(cfg)
    assert pl.domains == ("prose", "code")  # slots: 0 prose, 1 code, 2 replayed prose, 3 replayed code
    slots, ks = MixtureSchedule(pl).rows_at(13)  # shift: code, a quarter replayed prose
    assert slots.tolist() == [1, 1, 2, 1, 1, 2, 1, 1] and ks.tolist() == [7, 8, 97, 9, 10, 98, 11, 12]
    rows = [a for s in (0, 5, 12, 13, 22, 25, 27) for a in MixtureSchedule(pl).rows_at(s)]
    assert digest(rows) == "282e99f551dec221"
    draws = [example_index(cfg.seed, d, k, 1000) for d in ("prose", "code") for k in (0, 1, 2, 999, 1000, 5003)]
    assert draws == [273, 569, 344, 992, 38, 733, 439, 366, 181, 67, 627, 68]
    tokens = source_for(cfg).batch(13)["tokens"]
    for row, slot, k in zip(tokens, slots, ks):
        name = pl.domains[slot % len(pl.domains)]  # fresh slot d and replay slot D + d are both domain d
        shard = DomainData(demo_data / name).train
        L, n = cfg.data.seq_len, shard.num_sequences(cfg.data.seq_len)
        i = example_index(cfg.seed, name, k, n)
        np.testing.assert_array_equal(row, shard.read_tokens(i * L, i * L + L + 1))  # a plain slice of the stream


def test_host_slices_partition_the_global_batch(demo_data):
    cfg = smoke_config(demo_data)
    pl = plan.resolve(cfg)
    data = {d: DomainData(p) for d, p in cfg.data.domains}
    whole = BatchSource(pl, data).batch(14)["tokens"]
    halves = [BatchSource(pl, data, host=h, hosts=2).batch(14)["tokens"] for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_rows_come_from_the_domains_the_mixture_says(demo_data):
    cfg = smoke_config(demo_data)
    src = source_for(cfg)
    prose = DomainData(demo_data / "prose").train
    batch = src.batch(0)  # phase "base" is all prose: every row must be a prose sequence
    seq_len = cfg.data.seq_len
    all_prose = prose.sequences(np.arange(prose.num_sequences(seq_len)), seq_len)
    for row in batch["tokens"]:
        assert (all_prose == row).all(axis=1).any()


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
    state_sh = state_shardings(step_lib.resolve_dims(config.ModelConfig(preset="tiny"), 256), mesh)
    embed_sh = jax.tree.leaves(get(state_sh, "params")["embed"])[0]
    assert embed_sh.spec == jax.P("tensor", "fsdp")
    # Adam's first moment of the embedding shards like the embedding itself
    mu = jax.tree.leaves(get(state_sh, "opt_state").inner_state)
    assert any(getattr(s, "spec", None) == jax.P("tensor", "fsdp") for s in mu)


def test_reset_optimizer_gives_fresh_sharded_moments_and_keeps_params_and_step(demo_data):
    """The `reset` policy's function: moments and counts as a fresh `tx.init`, laid out like the params; the
    params and the step untouched. (That train() calls it at the phase start, and only there, is
    test_step.py's test_optimizer_reset_at_the_phase_start_in_train.)"""
    cfg = smoke_config(demo_data)
    mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
    src, state, step, tx, state_sh = sharded_step(cfg, mesh)
    with sharding.use_mesh(mesh):
        for s in range(3):
            state, _ = step(state, jax.device_put(src.batch(s)["tokens"], sharding.batch_sharding(mesh)))
    moments = lambda st: [np.asarray(x) for x in jax.tree.leaves(get(st, "opt_state").inner_state)]  # noqa: E731
    assert sum(np.abs(m).sum() > 0 for m in moments(state)) > len(moments(state)) // 2  # moved by the steps
    params_before = [np.asarray(x) for x in jax.tree.leaves(get(state, "params"))]
    reset = reset_optimizer(state, tx, state_sh)
    fresh = tx.init(get(reset, "params"))
    for a, b in zip(jax.tree.leaves(get(reset, "opt_state")), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # moments 0, counts 0, LR slot as init
    for arr, sh in zip(jax.tree.leaves(get(reset, "opt_state")), jax.tree.leaves(get(state_sh, "opt_state"))):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)  # moments stay split like their params
    assert int(get(reset, "step")) == 3
    for a, b in zip(jax.tree.leaves(get(reset, "params")), params_before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_nan_loss_skips_the_update(demo_data):
    cfg = smoke_config(demo_data)
    mesh = sharding.make_mesh(config.MeshConfig(data=-1))
    graphdef, params = seed_model(cfg, mesh)
    params = jax.tree.map(lambda x: x * jnp.nan if x.ndim == 1 else x, params)  # NaN norm scales -> NaN loss
    state, step = plain_step(cfg, graphdef, params)
    tokens = jnp.asarray(source_for(cfg).batch(0)["tokens"])
    with sharding.use_mesh(mesh):
        new, m = step(state, tokens)
    assert bool(m["skipped"]) and int(get(new, "skips")) == 1 and int(get(new, "step")) == 1
    assert int(get(new, "skipped")) == 1
    for a, b in zip(jax.tree.leaves(get(new, "opt_state")), jax.tree.leaves(get(state, "opt_state"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
