"""Attention kernels: the choice for each machine and shape, the segment forms, and every kernel against XLA.

Splash runs here in Pallas's interpreter (the same kernel code a TPU compiles), so its wiring (scaling,
layouts, GQA, segment ids, windows, the shard_map over a mesh) is checked on CPU. cuDNN needs a GPU: its
comparison runs only where one exists; its packed segment form is checked everywhere against a reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clt import attention, sharding
from clt.config import Config, ConfigError, MeshConfig, ModelConfig, from_dict
from clt.model import ModelDims, Transformer
from clt.step import model_options

EOS = 0


def qkv(b=2, t=128, n=4, k=2, h=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    kk = jnp.asarray(rng.standard_normal((b, t, k, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, k, h)), dtype)
    return q, kk, v


def documents(b=2, t=128, seed=1) -> jax.Array:
    """Rows with EOS at random places (several documents each, different per row)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, (b, t))
    tokens[rng.random((b, t)) < 0.05] = EOS
    tokens[0, t // 8] = tokens[1, t // 2] = EOS  # at least two documents in each row
    return jnp.asarray(tokens, jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# The choice.
# ----------------------------------------------------------------------------------------------------------
BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize("facts, expected", [
    (dict(backend="cpu", dtype=F32), "xla"),
    (dict(backend="cpu", dtype=BF16), "xla"),
    (dict(backend="gpu", dtype=BF16, compute_capability="9.0"), "cudnn"),
    (dict(backend="gpu", dtype=BF16, compute_capability="8.0"), "cudnn"),
    (dict(backend="gpu", dtype=F32, compute_capability="9.0"), "xla"),  # cuDNN flash is bf16/fp16 only
    (dict(backend="gpu", dtype=BF16, compute_capability="8.0", doc_mask=True), "xla"),  # packed needs Hopper
    (dict(backend="gpu", dtype=BF16, compute_capability="9.0", doc_mask=True), "cudnn"),
    (dict(backend="gpu", dtype=BF16, compute_capability="8.0", head_dim=256), "xla"),  # > 128 before Hopper
    (dict(backend="gpu", dtype=BF16, compute_capability="9.0", head_dim=256), "cudnn"),
    (dict(backend="gpu", dtype=BF16, compute_capability="9.0", head_dim=36), "xla"),  # not a multiple of 8
    (dict(backend="tpu", dtype=BF16), "splash"),
    (dict(backend="tpu", dtype=BF16, doc_mask=True), "splash"),
    (dict(backend="tpu", dtype=BF16, seq_len=1000), "xla"),  # splash tiles by 128
])
def test_auto_picks_the_fastest_kernel_that_supports_the_shape(facts, expected):
    facts = dict(dict(seq_len=2048, head_dim=64, doc_mask=False), **facts)
    assert attention.choose("auto", **facts) == expected
    assert attention.choose("xla", **facts) == "xla"  # XLA runs everything
    if expected != "xla":
        assert attention.choose(expected, **facts) == expected


@pytest.mark.parametrize("requested, facts, message", [
    ("splash", dict(backend="cpu"), "the splash attention kernel needs a TPU, this machine's backend is cpu"),
    ("cudnn", dict(backend="cpu"), "cuDNN flash attention needs a GPU, this machine's backend is cpu"),
    ("cudnn", dict(backend="gpu", dtype=F32), "cuDNN flash attention computes in bfloat16/float16, not float32"),
    ("cudnn", dict(backend="gpu", doc_mask=True, compute_capability="8.0"),
     "packed layout, which needs compute capability 9.0\\+ \\(Hopper\\), this GPU has 8.0"),
    ("splash", dict(backend="tpu", seq_len=1000), "seq_len 1000 is not a multiple"),
    ("flash", dict(backend="gpu"), "unknown attention implementation"),
])
def test_an_explicit_kernel_that_cannot_run_is_a_one_line_config_error(requested, facts, message):
    facts = dict(dict(seq_len=2048, head_dim=64, doc_mask=False, dtype=BF16, compute_capability="9.0"), **facts)
    with pytest.raises(ConfigError, match=rf"^model.attention = '{requested}': .*{message}") as e:
        attention.choose(requested, **facts)
    assert "\n" not in str(e.value)


def test_the_run_config_chooses_for_this_machine():
    def config(**model):
        return from_dict(dict(model=model, data=dict(domains={"a": "-"}, seq_len=128),
                              phases=(dict(name="p", steps=1, mixture={"a": 1.0}),)))

    cfg = config(attention="splash")
    dims = ModelDims(vocab_size=128, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64)
    with pytest.raises(ConfigError, match="model.attention = 'splash': the splash attention kernel needs a TPU"):
        model_options(cfg, EOS, dims)
    assert model_options(Config(model=ModelConfig()), EOS, dims)["attention"] == "xla"  # auto, on this CPU
    with pytest.raises(ConfigError, match=r"model.attention = 'fast': unknown attention implementation"):
        config(attention="fast")


# ----------------------------------------------------------------------------------------------------------
# Segment forms.
# ----------------------------------------------------------------------------------------------------------
def test_segment_ids_put_each_eos_in_the_document_it_ends():
    tokens = jnp.asarray([[5, 0, 7, 7, 0, 3], [0, 0, 4, 4, 4, 4]])
    np.testing.assert_array_equal(attention.segment_ids(tokens, EOS), [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]])


def test_packed_segments_give_each_document_its_start_and_length():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    lengths, offsets = attention.packed_segments(seg)
    np.testing.assert_array_equal(lengths, [[2, 3, 1, -1, -1, -1], [6, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]])


def packed_reference(q, k, v, lengths, offsets):
    """Causal attention inside each (offset, length) segment, computed segment by segment with numpy: what
    cuDNN's packed layout means, written without any mask."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q)
    for r in range(b):
        for start, length in zip(np.asarray(offsets[r]), np.asarray(lengths[r])):
            if length < 0:
                continue
            for i in range(start, start + length):
                for head in range(n):
                    keys = k[r, start:i + 1, head // group]
                    scores = keys @ q[r, i, head] / np.sqrt(h)
                    w = np.exp(scores - scores.max())
                    out[r, i, head] = (w / w.sum()) @ v[r, start:i + 1, head // group]
    return out


def test_the_packed_form_means_the_same_attention_as_the_document_mask():
    q, k, v = qkv(t=32)
    seg = attention.segment_ids(documents(t=32, seed=3), EOS)
    lengths, offsets = attention.packed_segments(seg)
    expected = packed_reference(q, k, v, lengths, offsets)
    np.testing.assert_allclose(attention.attend("xla", q, k, v, seg_bt=seg), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Kernels against XLA.
# ----------------------------------------------------------------------------------------------------------
def compare(kernel: str, seg, window: int, dtype=jnp.float32, atol=2e-5, grad_atol=1e-4):
    q, k, v = qkv(dtype=dtype)

    def loss(kern, q, k, v):  # a weighted sum, so every output element's gradient differs
        w = jnp.linspace(-1, 1, q.size, dtype=jnp.float32).reshape(q.shape)
        return jnp.sum(attention.attend(kern, q, k, v, seg_bt=seg, window=window).astype(jnp.float32) * w)

    ref = attention.attend("xla", q, k, v, seg_bt=seg, window=window)
    got = attention.attend(kernel, q, k, v, seg_bt=seg, window=window)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=atol)
    ref_g = jax.grad(loss, argnums=(1, 2, 3))("xla", q, k, v)
    got_g = jax.grad(loss, argnums=(1, 2, 3))(kernel, q, k, v)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=grad_atol)


@pytest.mark.parametrize("docs, window", [(False, 0), (True, 0), (True, 48)])
def test_splash_equals_xla_values_and_gradients(docs, window):
    compare("splash", attention.segment_ids(documents(), EOS) if docs else None, window)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("docs, window", [(False, 0), (True, 0), (False, 48)])
def test_cudnn_equals_xla_values_and_gradients(docs, window):
    compare("cudnn", attention.segment_ids(documents(), EOS) if docs else None, window, dtype=jnp.bfloat16,
            atol=2e-2, grad_atol=5e-2)


def test_splash_inside_the_sharded_model_equals_xla():
    """The whole model on a (data 2, fsdp 2, tensor 2) mesh: splash runs per shard through shard_map (batch
    over data x fsdp, heads over tensor); logits and gradients match the XLA model's with the same weights."""
    dims = ModelDims(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tokens = documents(b=4, t=129, seed=5)  # the model sees 128: inputs are tokens[:, :-1]

    def run(kernel):
        model = Transformer(dims, dtype=jnp.float32, doc_mask=True, eos_id=EOS, attention=kernel, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        @jax.jit
        def loss_and_grad(params, tokens):
            def loss(p):
                logits = nnx.merge(graphdef, p)(tokens[:, :-1])
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)), logits
            return jax.value_and_grad(loss, has_aux=True)(params)

        with sharding.use_mesh(mesh):
            (_, logits), grads = loss_and_grad(params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        return logits, grads

    (logits_x, grads_x), (logits_s, grads_s) = run("xla"), run("splash")
    np.testing.assert_allclose(logits_s, logits_x, atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(a, b, atol=2e-5)
