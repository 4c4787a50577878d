"""Llama-family decoder in Flax NNX: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Weights carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `norm`); the
mapping to mesh axes lives in `sharding.py`, so this file knows nothing about devices. Params are created
with eager sharding off, so a `Transformer` can be built anywhere (tests, Hugging Face import on the host,
`nnx.eval_shape` for abstract restore targets); `step.create_model` places it on a mesh.

Names follow their dims: b batch, t query position, s key position, d d_model, n heads, k kv heads,
h head_dim, f d_ff, v vocab. Attribute names mirror Hugging Face Llama (`q_proj`, `gate_proj`, ...), and RoPE
rotates the two halves of each head (HF's `rotate_half` convention), so weights map across by reshaping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from clt.attention import attend, segment_ids

# Dims a preset fixes; every entry can be overridden field by field from the config (step.resolve_dims).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, rope_theta=10000.0, tie_embeddings=True),
    # ~1.6M params: about 0.25 s per 16 x 128 step on a 2-core CPU, so `make demo` fits in minutes.
    "demo": dict(d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512, rope_theta=10000.0,
                 tie_embeddings=True),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, rope_theta=10000.0,
                 tie_embeddings=True),
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, rope_theta=500000.0,
               tie_embeddings=True),  # Llama-3.2-1B
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, rope_theta=10000.0,
               tie_embeddings=False),  # Llama-2-7B
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, rope_theta=500000.0,
               tie_embeddings=False),  # Llama-3-8B
}
REMAT_POLICIES = ("none", "full", "dots")


VOCAB_MULTIPLE = 128
"""Embedding rows are padded to a multiple of this: the table shards evenly over tensor axes, matmuls align."""
ROPE_SCALINGS = ("none", "llama3")


@dataclass(frozen=True)
class ModelDims:
    """Every dimension and architecture switch resolved: what the model is built from and what checkpoints
    record. The switches beyond Llama's are the ones published Llama-family models need (see clt/hf/)."""

    vocab_size: int
    """Logits per position; the embedding holds `padded_vocab` rows (the extra rows are never predicted)."""
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    # The switches published models need, as the `model.*` fields of the same names (clt/config/schema.py):
    # q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), llama3 RoPE scaling (Llama 3.x), a sliding window (Mistral).
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    sliding_window: int = 0

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def rope_frequencies(dims: ModelDims) -> jax.Array:
    """RoPE's inverse frequencies (head_dim/2 of them), with Llama 3.1 scaling when asked for.

    llama3 keeps the high frequencies (wavelength below original_context / high_freq_factor), divides the low
    ones (wavelength above original_context / low_freq_factor) by `factor`, and blends linearly in between."""
    h = dims.head_dim
    inv_freq = dims.rope_theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2 / h)
    if dims.rope_scaling == "none":
        return inv_freq
    if dims.rope_scaling != "llama3":
        raise ValueError(f"unknown rope_scaling {dims.rope_scaling!r}; use one of {ROPE_SCALINGS}")
    factor, low, high = dims.rope_factor, dims.rope_low_freq_factor, dims.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > dims.rope_original_context / low, inv_freq / factor, inv_freq)
    smooth = (dims.rope_original_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= dims.rope_original_context / high) & (wavelen <= dims.rope_original_context / low)
    return jnp.where(medium, blended, scaled)


def param_count(dims: ModelDims) -> int:
    """Parameters from the shape formula (tested against the built model)."""
    d, h = dims.d_model, dims.head_dim
    attn = d * dims.n_heads * h * 2 + d * dims.n_kv_heads * h * 2  # q, o; k, v
    attn += (dims.n_heads + 2 * dims.n_kv_heads) * h * dims.qkv_bias + 2 * h * dims.qk_norm
    layer = attn + 3 * d * dims.d_ff + 2 * d  # + gate, up, down; two norms
    embeddings = dims.padded_vocab * d * (1 if dims.tie_embeddings else 2)
    return dims.n_layers * layer + embeddings + d  # + final norm


ATTENTION_FLOPS = "causal"
"""The attention FLOPs convention of `flops_per_token`, named in the log and in benchmark results."""


def flops_per_token(dims: ModelDims, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) as MaxText counts them today:
    6·N + 6·L·n_heads·head_dim·K.

    N counts the matmul weights: every param but the norms, the biases and the embedding lookup (a gather);
    the output projection counts once, tied or not. K is the keys a query sees on average in full-length
    causal attention, half the context (or half a sliding window), so the term is half of PaLM's
    12·L·H·Q·T: the masked half of the score matrix is not work a flash kernel does. MFU figures by the
    PaLM convention are higher by that half; `ATTENTION_FLOPS` names the convention wherever MFU is shown.
    """
    n_matmul = param_count(dims) - dims.padded_vocab * dims.d_model * (0 if dims.tie_embeddings else 1)
    n_matmul -= (2 * dims.n_layers + 1) * dims.d_model + 2 * dims.n_layers * dims.head_dim * dims.qk_norm  # norms
    n_matmul -= dims.n_layers * (dims.n_heads + 2 * dims.n_kv_heads) * dims.head_dim * dims.qkv_bias  # biases
    keys = min(seq_len, dims.sliding_window) if dims.sliding_window else seq_len
    return 6.0 * n_matmul + 12.0 * dims.n_layers * dims.n_heads * dims.head_dim * keys / 2


# ----------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------
def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
    # eager_sharding=False: placement is create_model's job, so building the module needs no mesh context.
    return nnx.Param(nnx.with_partitioning(init, names, eager_sharding=False)(rngs.params(), shape, dtype))


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's logical sharding when a mesh and rules are active (a no-op elsewhere).

    Without it the compiler may follow the fsdp-sharded weights and split activations over d_model.
    """
    if jax.sharding.get_abstract_mesh().empty or not flax_spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, flax_spmd.apply_rules(names, ()))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(jnp.float32)  # the mean square in bf16 loses too much
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _rope(x_btnh: jax.Array, sin_th: jax.Array, cos_th: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_th[None, :, None, :], cos_th[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, dims: ModelDims, *, dtype, param_dtype, kernel: str, rngs: nnx.Rngs):
        d, n, k, h = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
        init, out_init = nnx.initializers.normal(0.02), nnx.initializers.normal(0.02 / math.sqrt(2 * dims.n_layers))
        self.q_proj = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = _param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        if dims.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, zeros, (n, h), ("heads", "head_dim"), param_dtype)
            self.k_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), param_dtype)
            self.v_bias = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), param_dtype)
        if dims.qk_norm:
            self.q_norm = RMSNorm(h, dims.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, dims.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype, self.qkv_bias, self.qk_norm = dtype, dims.qkv_bias, dims.qk_norm
        self.window, self.kernel = dims.sliding_window, kernel

    def _project(self, x_btd: jax.Array, name: str) -> jax.Array:
        """x @ W (+ bias) for name in q, k, v: heads kept as their own axis."""
        dt = self.dtype
        out = jnp.einsum("btd,dnh->btnh", x_btd, getattr(self, f"{name}_proj")[...].astype(dt))
        return out + getattr(self, f"{name}_bias")[...].astype(dt) if self.qkv_bias else out

    def __call__(self, x_btd, sin_th, cos_th, seg_bt):
        q_btnh, k_btkh, v_btkh = (self._project(x_btd, name) for name in "qkv")
        if self.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = _rope(q_btnh, sin_th, cos_th), _rope(k_btkh, sin_th, cos_th)
        # GQA is native in every kernel: n heads attend to k = n/g shared key/value heads.
        out_btnh = attend(self.kernel, q_btnh, k_btkh, v_btkh, seg_bt=seg_bt, window=self.window)
        return jnp.einsum("btnh,nhd->btd", out_btnh, self.o_proj[...].astype(self.dtype))


class MLP(nnx.Module):
    def __init__(self, dims: ModelDims, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = dims.d_model, dims.d_ff
        init, out_init = nnx.initializers.normal(0.02), nnx.initializers.normal(0.02 / math.sqrt(2 * dims.n_layers))
        self.gate_proj = _param(rngs, init, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, init, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, out_init, (f, d), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        gate_btf = jnp.einsum("btd,df->btf", x_btd, self.gate_proj[...].astype(dt))
        up_btf = jnp.einsum("btd,df->btf", x_btd, self.up_proj[...].astype(dt))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, self.down_proj[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, dims: ModelDims, *, dtype, param_dtype, kernel: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(dims.d_model, dims.norm_eps, **kw)
        self.attn = Attention(dims, kernel=kernel, **kw)
        self.mlp_norm = RMSNorm(dims.d_model, dims.norm_eps, **kw)
        self.mlp = MLP(dims, **kw)

    def __call__(self, x_btd, sin_th, cos_th, seg_bt):
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), sin_th, cos_th, seg_bt)
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return _constrain(x_btd, ("batch", None, None))


def _run_block(block: Block, x_btd, sin_th, cos_th, seg_bt):
    return block(x_btd, sin_th, cos_th, seg_bt)


class Transformer(nnx.Module):
    """Decoder-only LM: tokens (b, t) int -> logits (b, t, v) float32.

    `dtype` is the compute dtype (params are cast at use, stored in `param_dtype`). `remat` recomputes each
    block in the backward pass: "full" saves only the block inputs, "dots" also keeps the weight matmul
    outputs. With `doc_mask`, a token attends only to earlier tokens of its own document; a document ends at
    an `eos_id` token, inclusive. RoPE is relative, so no position reset is needed for documents to be exact.
    `attention` names the kernel (clt/attention.py: xla, cudnn, splash); `step.model_options` picks it.
    """

    def __init__(self, dims: ModelDims, *, dtype: jnp.dtype, param_dtype: jnp.dtype = jnp.float32,
                 remat: str = "none", doc_mask: bool = False, eos_id: int = -1, attention: str = "xla",
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; use one of {REMAT_POLICIES}")
        if dims.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling {dims.rope_scaling!r}; use one of {ROPE_SCALINGS}")
        if doc_mask and not 0 <= eos_id < dims.vocab_size:
            raise ValueError(f"doc_mask needs the tokenizer's EOS id, got eos_id={eos_id}")
        self.dims, self.dtype, self.remat, self.doc_mask, self.eos_id = dims, dtype, remat, doc_mask, eos_id
        d, v = dims.d_model, dims.padded_vocab
        self.embed = _param(rngs, nnx.initializers.normal(0.02), (v, d), ("vocab", "embed"), param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Block(dims, kernel=attention, **kw) for _ in range(dims.n_layers)])
        self.final_norm = RMSNorm(d, dims.norm_eps, **kw)
        if not dims.tie_embeddings:
            self.unembed = _param(rngs, nnx.initializers.normal(0.02), (d, v), ("embed", "vocab"), param_dtype)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        dims, t = self.dims, tokens_bt.shape[1]
        # Gather the table over fsdp first (as any FSDP layer does): a lookup into a table split on both
        # dims has no efficient partitioning, and XLA would replicate the whole table instead.
        embed_vd = _constrain(self.embed[...], ("vocab", None))
        x_btd = _constrain(jnp.take(embed_vd, tokens_bt, axis=0).astype(self.dtype), ("batch", None, None))
        angle_th = jnp.arange(t, dtype=jnp.float32)[:, None] * rope_frequencies(dims)[None, :]
        sin_th, cos_th = jnp.sin(angle_th), jnp.cos(angle_th)
        seg_bt = segment_ids(tokens_bt, self.eos_id) if self.doc_mask else None

        run = _run_block
        if self.remat == "full":
            run = nnx.remat(_run_block)
        elif self.remat == "dots":
            run = nnx.remat(_run_block, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
        for block in self.layers:
            x_btd = run(block, x_btd, sin_th, cos_th, seg_bt)

        x_btd = self.final_norm(x_btd)
        if dims.tie_embeddings:
            logits_btv = jnp.einsum("btd,vd->btv", x_btd, self.embed[...].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        else:
            logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.unembed[...].astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        # The padding rows are not tokens: they get no logits (and so no probability mass).
        return logits_btv if dims.padded_vocab == dims.vocab_size else logits_btv[..., :dims.vocab_size]
