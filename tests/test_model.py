"""The decoder: shapes, causality, document masking, GQA, parameter and FLOP formulas, remat, dims."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clt.config import Config, ConfigError, ModelConfig
from clt.model import PRESETS, ModelDims, Transformer, flops_per_token, param_count
from clt.step import model_options, resolve_dims

VOCAB, EOS = 128, 0


def tiny(**changes) -> ModelDims:
    return dataclasses.replace(resolve_dims(ModelConfig(preset="tiny"), VOCAB), **changes)


def build(dims: ModelDims, **kwargs) -> Transformer:
    return Transformer(dims, dtype=kwargs.pop("dtype", jnp.float32), rngs=nnx.Rngs(0), **kwargs)


def forward(model: Transformer, tokens) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def model():
    return build(tiny())


def tokens(seed: int, shape=(2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, shape)  # 1..: no EOS unless placed


# ----------------------------------------------------------------------------------------------------------
def test_logits_are_float32_batch_by_length_by_vocab():
    out = forward(build(tiny(), dtype=jnp.bfloat16), tokens(0))
    assert out.shape == (2, 16, VOCAB) and out.dtype == np.float32


def test_bf16_compute_keeps_float32_params():
    m = build(tiny(), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_attention_is_causal(model):
    a = tokens(1)
    b = a.copy()
    b[:, 9] = (b[:, 9] % (VOCAB - 1)) + 1  # another non-EOS token at position 9
    la, lb = forward(model, a), forward(model, b)
    np.testing.assert_allclose(la[:, :9], lb[:, :9], atol=1e-6)
    assert np.abs(la[:, 9:] - lb[:, 9:]).max(axis=-1).min() > 1e-4  # every later position sees it


def test_positions_matter():
    """One layer of attention without positions sees its keys as a set; RoPE must break that symmetry."""
    one_layer = build(tiny(n_layers=1))
    a = tokens(6)
    b = a.copy()
    b[:, [0, 1]] = a[:, [1, 0]]
    assert np.abs(forward(one_layer, a)[:, -1] - forward(one_layer, b)[:, -1]).max() > 1e-4


def test_doc_mask_isolates_documents():
    a = tokens(2)
    a[:, 5] = EOS  # document 1 = positions 0..5 (EOS inclusive), document 2 = 6..15
    b = a.copy()
    b[:, :5] = tokens(3, (2, 5))
    masked = build(tiny(), doc_mask=True, eos_id=EOS)
    la, lb = forward(masked, a), forward(masked, b)
    np.testing.assert_allclose(la[:, 6:], lb[:, 6:], atol=1e-6)
    assert np.abs(la[:, 5] - lb[:, 5]).max() > 1e-4  # the EOS still belongs to (and sees) document 1
    plain = build(tiny())  # the same weights without the mask: document 2 does see document 1
    assert np.abs(forward(plain, a)[:, 6:] - forward(plain, b)[:, 6:]).max() > 1e-4


def test_a_packed_document_reads_as_if_alone():
    """Doc mask plus relative (RoPE) positions: a document's logits do not depend on its offset in the row."""
    row = tokens(5)
    row[:, 5] = EOS
    masked = build(tiny(), doc_mask=True, eos_id=EOS)
    np.testing.assert_allclose(forward(masked, row)[:, 6:], forward(masked, row[:, 6:]), atol=2e-5)


def test_doc_mask_needs_an_eos_id():
    # the config says which field to change when the data's tokenizer has no EOS ...
    with pytest.raises(ConfigError, match=r"model.doc_mask = True: the data's tokenizer has no EOS id"):
        model_options(Config(model=ModelConfig(doc_mask=True)), eos_id=-1, dims=tiny())
    # ... and the model itself refuses to mask without one (it knows no config)
    with pytest.raises(ValueError, match=r"doc_mask needs the tokenizer's EOS id, got eos_id=-1"):
        build(tiny(), doc_mask=True)


def test_grouped_query_attention_shapes(model):
    d, n, k, h = 64, 4, 2, 16
    attn = model.layers[0].attn
    assert attn.q_proj.shape == (d, n, h) and attn.o_proj.shape == (n, h, d)
    assert attn.k_proj.shape == attn.v_proj.shape == (d, k, h)


@pytest.mark.parametrize("changes", [{}, dict(tie_embeddings=False, n_kv_heads=1, n_layers=3)])
def test_param_count_formula_matches_model(changes):
    dims = tiny(**changes)
    m = build(dims)
    assert count_params(m) == param_count(dims)
    assert hasattr(m, "unembed") == (not dims.tie_embeddings)


def maxtext_flops_per_token(d: ModelDims, seq: int) -> float:
    """MaxText's calculate_tflops_training_per_device for a dense Llama block, divided by the tokens of a step:
    ((ffn + qkv + projection) * layers + embedding) * 3 + causal attention * layers * 3, where causal attention
    is half of 4·B·S²·heads·head_dim. Written out here from MaxText's terms, independently of clt's N."""
    B, S, E = 1, seq, d.d_model
    ffn = 2 * B * S * d.d_ff * E * 2 + 2 * B * S * d.d_ff * E  # gate and up (silu, linear), then down
    qkv = 2 * B * S * E * (d.n_heads + 2 * d.n_kv_heads) * d.head_dim
    projection = 2 * B * S * E * d.n_heads * d.head_dim
    embedding = 2 * B * S * E * d.padded_vocab
    causal_attention = 4 * B * S ** 2 * d.n_heads * d.head_dim / 2
    return (((ffn + qkv + projection) * d.n_layers + embedding) * 3 + causal_attention * d.n_layers * 3) / (B * S)


@pytest.mark.parametrize("changes", [{}, dict(tie_embeddings=False), dict(n_kv_heads=1, n_layers=3)])
def test_flops_per_token_is_maxtexts_causal_count(changes):
    dims = tiny(**changes)
    for seq in (128, 256, 2048):
        assert flops_per_token(dims, seq) == pytest.approx(maxtext_flops_per_token(dims, seq), rel=1e-12)
    # The attention term is half of PaLM's 12·L·H·Q·T: doubling the context adds 6·L·H·Q per token of context.
    assert flops_per_token(dims, 256) - flops_per_token(dims, 128) == 6 * dims.n_layers * 4 * 16 * 128
    windowed = tiny(sliding_window=64, **changes)  # a query sees at most 64 keys: the term stops growing
    assert flops_per_token(windowed, 2048) == flops_per_token(windowed, 64) == flops_per_token(dims, 64)


def loss_and_grads(m: Transformer):
    x = jnp.asarray(tokens(4, (2, 17)))

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x[:, :-1]), x[:, 1:]).mean()
    return nnx.jit(nnx.value_and_grad(loss))(m)


@pytest.fixture(scope="module")
def no_remat_loss_and_grads():
    return loss_and_grads(build(tiny()))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_grads(remat, no_remat_loss_and_grads):
    l0, g0 = no_remat_loss_and_grads
    l1, g1 = loss_and_grads(build(tiny(), remat=remat))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


# ----------------------------------------------------------------------------------------------------------
def test_resolve_dims_explicit_fields_override_the_preset():
    dims = resolve_dims(ModelConfig(preset="demo", n_layers=2, tie_embeddings=False, vocab_size=300), 257)
    assert (dims.d_model, dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.head_dim) == (192, 2, 6, 2, 32)
    assert dims.tie_embeddings is False and dims.vocab_size == 300 and dims.rope_theta == 10000.0
    assert resolve_dims(ModelConfig(preset="8b"), 257).rope_theta == 500000.0
    assert resolve_dims(ModelConfig(preset="tiny"), 257).vocab_size == 257


def test_resolve_dims_without_preset_needs_every_dim():
    dims = resolve_dims(ModelConfig(preset="", d_model=32, n_layers=1, n_heads=2, d_ff=64), 100)
    assert dims.n_kv_heads == 2 and dims.head_dim == 16
    with pytest.raises(ConfigError, match=r"model.n_layers = 0: preset \"\" needs explicit dims, missing "
                                          r"\['n_layers', 'd_ff'\]"):
        resolve_dims(ModelConfig(preset="", d_model=32, n_heads=2), 100)


@pytest.mark.parametrize("cfg, pattern", [
    (ModelConfig(preset="13b"), r"model.preset = '13b': unknown preset; use one of \['125m', '1b', '7b', '8b', "
                                r"'demo', 'tiny'\]"),
    (ModelConfig(preset="tiny", n_kv_heads=3), r"model.n_kv_heads = 3: n_heads=4 is not a multiple of n_kv_heads=3"),
    (ModelConfig(preset="tiny", n_heads=6, n_kv_heads=6), r"model.n_heads = 6: d_model=64 is not divisible by "
                                                          r"n_heads=6"),
    (ModelConfig(preset="tiny", d_ff=-1), r"model.d_ff = -1: must be positive"),
    (ModelConfig(preset="tiny", n_heads=64, n_kv_heads=64), r"model.n_heads = 64: head_dim = d_model/n_heads = 1 is odd"),
])
def test_resolve_dims_rejects_bad_shapes(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_dims(cfg, 100)


def test_resolve_dims_needs_a_vocab():
    with pytest.raises(ConfigError, match=r"model.vocab_size = 0: must be positive"):
        resolve_dims(ModelConfig(preset="tiny"), 0)


# Each preset's shape, written out independently of model.PRESETS: (d_model, n_layers, n_heads, n_kv_heads, d_ff,
# rope_theta, tied embeddings); the size its name (or docs) give, at its usual vocabulary, with a tolerance.
PRESET_TABLE = {
    "tiny": ((64, 2, 4, 2, 192, 1e4, True), 384, 123_200, 0),  # exact: a pinned tiny test model
    "demo": ((192, 4, 6, 2, 512, 1e4, True), 384, 1.6e6, 0.05),  # "~1.6M params" (README, model.PRESETS)
    "125m": ((768, 12, 12, 12, 2048, 1e4, True), 50304, 125e6, 0.02),  # GPT-2's vocab padded to 64
    "1b": ((2048, 16, 32, 8, 8192, 5e5, True), 128256, 1_235_814_400, 0),  # Llama-3.2-1B
    "7b": ((4096, 32, 32, 32, 11008, 1e4, False), 32000, 6_738_415_616, 0),  # Llama-2-7B
    "8b": ((4096, 32, 32, 8, 14336, 5e5, False), 128256, 8_030_261_248, 0),  # Llama-3-8B
}


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_each_preset_has_its_shape_and_the_size_its_name_says(name):
    """The table above, the built model (abstract: no memory) and param_count's formula agree for every preset; a new
    preset must be added to the table."""
    shape, vocab, size, rel = PRESET_TABLE[name]
    dims = resolve_dims(ModelConfig(preset=name), vocab)
    got = (dims.d_model, dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.d_ff, dims.rope_theta, dims.tie_embeddings)
    assert got == shape and dims.head_dim == dims.d_model // dims.n_heads and dims.vocab_size == vocab
    # the built model's count, from abstract 1- and 2-layer models (layers are identical: the rest is linear)
    one, two = (count_params(nnx.eval_shape(lambda n=n: Transformer(dataclasses.replace(dims, n_layers=n),
                                                                   dtype=jnp.float32, rngs=nnx.Rngs(0))))
                for n in (1, 2))
    assert one + (dims.n_layers - 1) * (two - one) == param_count(dims)
    assert param_count(dims) == pytest.approx(size, rel=rel)


def test_the_preset_table_lists_every_preset():
    assert sorted(PRESETS) == sorted(PRESET_TABLE)


@pytest.mark.parametrize("remat, policy", [("none", None), ("full", "None"), ("dots", "DotsSaveable")])
def test_remat_checkpoints_each_block(remat, policy):
    graphdef, state = nnx.split(build(tiny(), remat=remat))
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.zeros((1, 8), jnp.int32))
    remats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith(("remat", "checkpoint"))]
    assert len(remats) == (0 if policy is None else 2)  # one per layer
    assert all(repr(e.params["policy"]).startswith(policy) for e in remats)
