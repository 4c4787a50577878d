"""The train step against independent computations: the loss is the mean next-token cross-entropy; a step on an
fsdp x tensor mesh, or with accumulated micro-batches, is the one-device, one-batch step; document masking is
used in training; bf16 compute tracks float32; the `reset` optimizer policy acts at its phase start in train().
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import smoke_config
from flax import nnx

from clt import checkpoint, config, plan, sharding, train
from clt import step as step_lib
from clt.data.pipeline import BatchSource
from clt.data.prepare import prepare_text
from clt.data.shards import DomainData
from clt.metrics import TIMING_FIELDS, read_jsonl
from clt.optim import make_optimizer

TIMING = TIMING_FIELDS  # measured by the clock: the only fields identical runs may disagree on


# ----------------------------------------------------------------------------------------------------------
# The train state and step of clt.step, built as `clt train` builds them. Only these helpers touch its API.
# ----------------------------------------------------------------------------------------------------------
def build(cfg, mesh, data, **model_kwargs):
    """(graphdef, fresh train state, jitted step, abstract state, state shardings) for `cfg` on `mesh`, built as
    clt train builds them."""
    tx = make_optimizer(cfg.optim)
    dims = step_lib.model_dims(cfg, max(d.vocab_size for d in data.values()))
    graphdef, params, abstract, state_sh = step_lib.state_layout(dims, mesh, tx, seed=cfg.seed, **model_kwargs)
    step = step_lib.compile_step(graphdef, tx, plan.resolve(cfg), cfg.optim, state_sh,
                                 sharding.batch_sharding(mesh), sharding.replicated(mesh))
    return graphdef, step_lib.init_state(params, tx, state_sh), step, abstract, state_sh


def seed_model(cfg, mesh):
    """The seed's initial model (float32) created into its shards on `mesh`."""
    dims = step_lib.model_dims(cfg, max(d.vocab_size for d in domains(cfg).values()))
    return step_lib.create_model(dims, mesh, seed=cfg.seed, dtype=jnp.float32)


def params_of(state):
    return state.params


# ----------------------------------------------------------------------------------------------------------
def raw_state(wd, step):
    """A checkpoint's arrays as stored (plain nested dicts), read without any layout."""
    store = checkpoint.CheckpointStore(wd / "checkpoints", config.CheckpointConfig(), read_only=True)
    state = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    store.close()
    return state


def optimizer_counts(raw) -> list[int]:
    """Every `count` in a stored optimizer state (the injected-hyperparameter count and Adam's bias-correction
    count): the number of updates since the optimizer state was created."""
    leaves = jax.tree_util.tree_leaves_with_path(raw["opt_state"])
    return [int(np.asarray(x)) for path, x in leaves if getattr(path[-1], "key", None) == "count"]


def train_rows(wd) -> dict[int, dict]:
    """The logged train rows of a workdir by step, without the timing fields."""
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(wd / "metrics.jsonl")
            if "loss" in r}


def one_device():
    return sharding.make_mesh(config.MeshConfig(data=1), jax.devices()[:1])


def domains(cfg):
    return {d: DomainData(p) for d, p in cfg.data.domains}


def as_numpy(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


STEPS = 3  # step 0 runs at LR 0 (warmup from 0); steps 1 and 2 move the params


def run_steps(cfg, mesh):
    """Losses, grad norms and the params after STEPS steps of `cfg` on `mesh` (float32 compute)."""
    data = domains(cfg)
    _, state, step, _, _ = build(cfg, mesh, data, dtype=jnp.float32)
    start = as_numpy(params_of(state))
    src = BatchSource(plan.resolve(cfg), data)
    losses, norms = [], []
    with sharding.use_mesh(mesh):
        for s in range(STEPS):
            state, m = step(state, jax.device_put(src.batch(s)["tokens"], sharding.batch_sharding(mesh)))
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
    return dict(loss=np.array(losses), grad_norm=np.array(norms), start=start, params=as_numpy(params_of(state)))


@pytest.fixture(scope="module")
def reference(demo_data):
    """The smoke config's first steps on one device, one batch per step: what every layout must reproduce."""
    return run_steps(smoke_config(demo_data), one_device())


def assert_same_steps(got, ref):
    # float32 sums split differently over devices or micro-batches: measured differences are <= 1e-7 relative
    # for the loss and grad norm and <= 1.2e-7 absolute for the params, while the steps move a param by ~3e-3
    # (median; Adam's first updates are ~lr * sign(grad)). The tolerances are ~10x the noise, ~1000x below
    # an update; a grad norm summed instead of averaged over micro-batches is 4x off.
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-6)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=2e-6)
    for a, b in zip(got["start"], ref["start"], strict=True):
        np.testing.assert_array_equal(a, b)  # the seed's weights on any mesh
    for a, b in zip(got["params"], ref["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
def test_step_loss_is_the_mean_next_token_cross_entropy(demo_data, reference):
    """Step 0's loss from optax's cross-entropy on the seed's initial model: catches a loss on unshifted
    targets, a sum instead of a mean, the z-loss in the logged loss, or another initialisation."""
    cfg = smoke_config(demo_data)
    model = seed_model(cfg, one_device())
    tokens = jnp.asarray(BatchSource(plan.resolve(cfg), domains(cfg)).batch(0)["tokens"])
    logits = nnx.jit(lambda m, t: m(t))(model, tokens[:, :-1])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert reference["loss"][0] == pytest.approx(float(expected), rel=1e-6)
    # and the reference really trains: the params comparisons of the tests below are not of idle params
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(reference["params"], reference["start"])])
    assert np.median(moved) > 1e-3 and reference["loss"][2] < reference["loss"][0]


@pytest.mark.parametrize("mesh_cfg", [dict(data=2, fsdp=2, tensor=2)], ids=["data2-fsdp2-tensor2"])
def test_sharded_step_matches_one_device(demo_data, reference, mesh_cfg):
    """The same steps on 8 devices (batch rows over data x fsdp, weights over fsdp and tensor) give the
    one-device losses and params: catches init or math that depends on the layout, e.g. a gradient not summed
    over the data/fsdp rows or summed twice in a hand-written collective. (Pure data parallelism, data=8, is
    one more id here: ~15 s of compile on 2 cores, left out to keep the suite short.)"""
    got = run_steps(smoke_config(demo_data), sharding.make_mesh(config.MeshConfig(**mesh_cfg)))
    assert_same_steps(got, reference)


def test_grad_accum_matches_one_big_batch(demo_data, reference):
    """grad_accum=4 over the same rows: micro-batch grads averaged, not summed, and every micro-batch counted."""
    got = run_steps(smoke_config(demo_data, "optim.grad_accum=4"), one_device())
    assert_same_steps(got, reference)


# ----------------------------------------------------------------------------------------------------------
def short_documents(path, n=3000, seed=0):
    """A text of short paragraphs (1-4 words): every 33-token row packs several documents."""
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat and dog ran to red box of tea in sun".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(1, 5))) for _ in range(n)) + "\n")
    return path


def per_document_loss(graphdef, params, tokens, eos):
    """Mean next-token loss when every document of each row is run alone through the model (no doc mask),
    starting at position 0: the doc-masked loss computed without the mask."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    L = x.shape[1]
    rows, spans = [], []
    for r in range(len(x)):
        ends = [i + 1 for i in np.flatnonzero(x[r] == eos)]  # an EOS closes the document it ends
        for a, b in zip([0, *ends], [*ends, L]):
            if a < b:
                seg = np.zeros(L, np.int32)
                seg[: b - a] = x[r, a:b]  # right padding: causal attention never reads it
                rows.append(seg), spans.append((r, a, b))
    logits = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(np.stack(rows))),
                        np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    nll = np.zeros(y.shape)
    for j, (r, a, b) in enumerate(spans):
        nll[r, a:b] = -logp[j, np.arange(b - a), y[r, a:b]]
    return nll.mean()


def test_doc_mask_is_used_in_training(tmp_path):
    """train() with model.doc_mask=True on packed short documents: the logged loss of step 0 is the loss of each
    document run alone through the seed's model, and not the loss of whole rows. Catches a trainer that drops
    the flag or passes the wrong EOS id."""
    prepare_text([str(short_documents(tmp_path / "short.txt"))], domain="short", tokenizer="byte",
                 out=str(tmp_path / "short"), split="paragraph", progress=False)
    cfg = config.from_dict(dict(
        model=dict(preset="tiny", doc_mask=True, dtype="float32"), batch_size=8, log=dict(every=1),
        data=dict(domains={"short": str(tmp_path / "short")}, seq_len=32, block_rows=64, eval_sequences=8,
                  eval_batch=8),
        phases=(dict(name="only", steps=1, mixture={"short": 1.0}, schedule=dict(kind="constant", peak=1e-3)),)))
    train.train(cfg, str(tmp_path / "run"), progress=False)
    logged = next(r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] == 0 and "loss" in r)

    data = domains(cfg)
    eos = data["short"].train.eos_id
    tokens = BatchSource(plan.resolve(cfg), data).batch(0)["tokens"]
    assert all((row[:-1] == eos).sum() >= 2 for row in tokens)  # every row packs 3+ documents
    graphdef, state, _, _, _ = build(cfg, one_device(), data, dtype=jnp.float32)  # the seed's model, no mask
    params = params_of(state)
    masked = per_document_loss(graphdef, params, tokens, eos)
    whole_rows = optax.softmax_cross_entropy_with_integer_labels(
        jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens[:, :-1])), tokens[:, 1:]).mean()
    # float32 sums of 256 token losses agree to ~1e-7 relative; at init the mask moves this batch's loss by ~3e-4
    assert logged == pytest.approx(masked, rel=2e-6)
    assert abs(float(whole_rows) / masked - 1) > 4e-5


# ----------------------------------------------------------------------------------------------------------
def test_bf16_losses_track_float32(demo_data, smoke_run, tmp_path):
    """The smoke run's first steps with model.dtype=bfloat16 log losses within 2e-4 (relative) of the float32
    run's (the smoke run: dtype "auto" is float32 on CPU), and not equal to them (bf16 is really used).

    Why 2e-4: bf16 rounds matmul inputs and activations to 8 significant bits (2^-9 = 0.2% relative), but
    params stay float32, logits are accumulated and the loss computed in float32, and the per-token errors have
    either sign and average out over the batch's 256 tokens: measured, the bf16 losses of steps 1, 3, 5 differ
    by 0.5-1.4e-5 relative; 2e-4 leaves 14x that. A loss held in bf16 is off by its rounding, up to 2^-9
    relative (here 2.6e-4 to 5e-4 at these three steps: caught), and a broken bf16 path (an overflowing norm,
    updates lost to a bf16 cast) by more."""
    _, ref_wd, _ = smoke_run
    assert step_lib.compute_dtype("auto") == jnp.float32
    cfg = smoke_config(demo_data, "model.dtype='bfloat16'", "debug.preempt_at_step=6")
    train.train(cfg, str(tmp_path), progress=False)
    bf16 = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r}
    fp32 = {r["step"]: r["loss"] for r in read_jsonl(ref_wd / "metrics.jsonl") if "loss" in r and r["step"] < 6}
    assert sorted(bf16) == sorted(fp32) == [1, 3, 5]
    for s in fp32:
        assert bf16[s] == pytest.approx(fp32[s], rel=2e-4), s
    assert any(bf16[s] != fp32[s] for s in fp32)
    assert fp32[5] < fp32[1] - 0.5 and bf16[5] < bf16[1] - 0.5  # both learn, by far more than the tolerance


# ----------------------------------------------------------------------------------------------------------
def test_optimizer_reset_at_the_phase_start_in_train(demo_data, smoke_run, tmp_path):
    """phases.shift.optimizer=reset: a fresh optimizer at step 12 and only there. The smoke run (keep) has
    taken 12 and 22 updates at its phase ends; the reset run's checkpoint at 16 has taken 4 (steps 12-15).
    The runs agree up to the switch and differ after it."""
    _, keep_wd, _ = smoke_run
    cfg = smoke_config(demo_data, "phases.shift.optimizer='reset'", "debug.preempt_at_step=16")
    train.train(cfg, str(tmp_path), progress=False)
    assert set(optimizer_counts(raw_state(tmp_path, 16))) == {4}
    assert set(optimizer_counts(raw_state(keep_wd, 12))) == {12}
    assert set(optimizer_counts(raw_state(keep_wd, 22))) == {22}
    reset, keep = train_rows(tmp_path), train_rows(keep_wd)
    assert [reset[s] for s in reset if s < 12] == [keep[s] for s in keep if s < 12]
    assert sorted(s for s in reset if s >= 12) == [13, 15]
    assert reset[13] == keep[13]  # the shift's first step has LR 0 (warmup): the params first differ after 13
    assert abs(reset[15]["loss"] - keep[15]["loss"]) > 1e-4
