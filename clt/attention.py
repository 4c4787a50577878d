"""Causal self-attention kernels and the choice between them: XLA everywhere, cuDNN flash on GPU, Pallas
splash on TPU.

`jax.nn.dot_product_attention` without `implementation=` takes the XLA path, which materialises the (t, s)
score matrix: fine on CPU, a memory and speed cliff on accelerators at seq 2048+. The flash kernels never
build it. All three take the same inputs, (b, t, n, h) queries and (b, s, k, h) keys/values with n a multiple
of k (grouped-query attention), and the same document structure, given as segment ids (b, t): token i sees
token j <= i only when both carry the same id. Each kernel receives it in its native form:
- xla: a boolean (b, 1, t, s) mask;
- splash: `SegmentIds`, evaluated block-wise inside the kernel;
- cudnn: the packed ("ragged") layout, per-row segment offsets and lengths, which cuDNN supports on Hopper
  and later (compute capability 9.0); older GPUs would need a materialised bias, so clt refuses that pair.

`choose` turns `model.attention` (auto | xla | cudnn | splash) into one of these for a backend and shape;
an explicit choice the machine or shape cannot run is a ConfigError naming the field, never a crash inside
the compiled step. The kernels know nothing of configs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd

from clt.config import ConfigError
from clt.config.schema import ATTENTION_CHOICES as CHOICES
SPLASH_BLOCK = 128
"""Splash tiles the sequence in blocks of 128 (the TPU lane width) at least; seq_len must be a multiple."""


# ----------------------------------------------------------------------------------------------------------
# The choice.
# ----------------------------------------------------------------------------------------------------------
def unsupported(kernel: str, *, backend: str, dtype: jnp.dtype, seq_len: int, head_dim: int, doc_mask: bool,
                compute_capability: str | None = None) -> str | None:
    """Why `kernel` cannot run this shape on this backend, or None when it can."""
    if kernel == "xla":
        return None
    if kernel == "cudnn":
        if backend != "gpu":
            return f"cuDNN flash attention needs a GPU, this machine's backend is {backend}"
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention computes in bfloat16/float16, not {jnp.dtype(dtype).name}"
        hopper = compute_capability is not None and float(compute_capability) >= 9.0
        limit = 256 if hopper else 128
        if head_dim % 8 or head_dim > limit:
            return f"cuDNN flash attention needs head_dim a multiple of 8 and <= {limit}, got {head_dim}"
        if doc_mask and not hopper:
            return (f"document masking in cuDNN uses the packed layout, which needs compute capability 9.0+ "
                    f"(Hopper), this GPU has {compute_capability}")
        return None
    if kernel == "splash":
        if backend != "tpu":
            return f"the splash attention kernel needs a TPU, this machine's backend is {backend}"
        if seq_len % SPLASH_BLOCK:
            return f"splash attention tiles the sequence by {SPLASH_BLOCK}; seq_len {seq_len} is not a multiple"
        return None
    return f"unknown attention kernel {kernel!r}"


def choose(requested: str, *, backend: str, dtype: jnp.dtype, seq_len: int, head_dim: int, doc_mask: bool,
           compute_capability: str | None = None) -> str:
    """The kernel for `model.attention = requested`: auto takes the fastest that supports the shape (splash on
    TPU, cuDNN on GPU, XLA otherwise); an explicit choice that cannot run is a ConfigError."""
    if requested not in CHOICES:
        raise ConfigError("model.attention", requested, "unknown attention implementation", f"use one of {CHOICES}")
    facts = dict(backend=backend, dtype=dtype, seq_len=seq_len, head_dim=head_dim, doc_mask=doc_mask,
                 compute_capability=compute_capability)
    if requested == "auto":
        return next(k for k in ("splash", "cudnn", "xla") if unsupported(k, **facts) is None)
    why = unsupported(requested, **facts)
    if why:
        raise ConfigError("model.attention", requested, why, "use model.attention=auto (or xla)")
    return requested


def device_facts() -> dict:
    """The backend and (on NVIDIA GPUs) the compute capability of this process's first device."""
    device = jax.devices()[0]
    return dict(backend=jax.default_backend(), compute_capability=getattr(device, "compute_capability", None))


# ----------------------------------------------------------------------------------------------------------
# Documents as segment ids, and their other forms.
# ----------------------------------------------------------------------------------------------------------
def segment_ids(tokens_bt: jax.Array, eos_id: int) -> jax.Array:
    """(b, t) int32 document index within each row; an EOS belongs to the document it ends."""
    is_eos_bt = (tokens_bt == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos_bt, axis=1) - is_eos_bt


def segment_mask(seg_bt: jax.Array) -> jax.Array:
    """The XLA form: (b, 1, t, s) True where query and key share a document (causality comes separately)."""
    return (seg_bt[:, :, None] == seg_bt[:, None, :])[:, None]


def packed_segments(seg_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cuDNN packed form of nondecreasing segment ids starting at 0: (lengths (b, t), offsets (b, t + 1)).

    Row r's m-th document starts at offsets[r, m] and has lengths[r, m] tokens; entries past the row's last
    document are -1, as cuDNN's ragged layout expects. A row of t tokens has at most t documents, so the
    static bound t is always enough (the arrays are tiny next to the activations)."""
    b, t = seg_bt.shape
    lengths = jnp.zeros((b, t), jnp.int32).at[jnp.arange(b)[:, None], seg_bt].add(1)
    present = lengths > 0
    offsets = jnp.cumsum(lengths, axis=1) - lengths
    lengths = jnp.where(present, lengths, -1)
    offsets = jnp.concatenate([jnp.where(present, offsets, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets


# ----------------------------------------------------------------------------------------------------------
# The kernels. q (b, t, n, h), k and v (b, s, k, h) -> (b, t, n, h); causal; optional sliding window.
# ----------------------------------------------------------------------------------------------------------
def attend(kernel: str, q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, *, seg_bt: jax.Array | None,
           window: int = 0) -> jax.Array:
    """Causal attention by `kernel`; `seg_bt` restricts it to documents, `window` (> 0) to the most recent
    `window` keys, the query itself included."""
    if kernel == "xla":
        mask = segment_mask(seg_bt) if seg_bt is not None else None
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, is_causal=True,
                                            local_window_size=(window - 1, 0) if window else None,
                                            implementation="xla")
    if kernel == "cudnn":
        return _cudnn(q_btnh, k_bskh, v_bskh, seg_bt, window)
    if kernel == "splash":
        return _splash_sharded(q_btnh, k_bskh, v_bskh, seg_bt, window)
    raise ValueError(f"unknown attention kernel {kernel!r}; use one of {CHOICES[1:]}")


def _cudnn(q_btnh, k_bskh, v_bskh, seg_bt, window):
    if seg_bt is None:
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=True, implementation="cudnn",
                                            local_window_size=(window - 1, 0) if window else None)
    # Documents: the packed layout, reachable through the module behind jax.nn's cuDNN path (jax.nn takes
    # no segment offsets). It has its own sharding rules, as the public path does.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    lengths, offsets = packed_segments(seg_bt)
    return cudnn.dot_product_attention(q_btnh, k_bskh, v_bskh, None, None, lengths, lengths, offsets, offsets,
                                       scale=1.0 / math.sqrt(q_btnh.shape[-1]),
                                       mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
                                       sliding_window_length=window or None)


def _splash_sharded(q_btnh, k_bskh, v_bskh, seg_bt, window):
    """Splash is a Pallas kernel: XLA cannot partition it, so under a mesh it runs per shard (batch over the
    batch axes, heads over the tensor axis, as the activations are laid out) through `jax.shard_map`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not flax_spmd.get_logical_axis_rules():
        return _splash(q_btnh, k_bskh, v_bskh, seg_bt, window)
    qkv_spec = flax_spmd.apply_rules(("batch", None, "heads", None), ())
    kv_spec = flax_spmd.apply_rules(("batch", None, "kv_heads", None), ())
    seg_spec = jax.P(qkv_spec[0], None)
    if seg_bt is None:
        fn = functools.partial(_splash, seg_bt=None, window=window)
        return jax.shard_map(fn, in_specs=(qkv_spec, kv_spec, kv_spec), out_specs=qkv_spec, check_vma=False)(
            q_btnh, k_bskh, v_bskh)
    fn = functools.partial(_splash, window=window)
    # check_vma=False: a Pallas call does not declare how its output varies over the mesh axes.
    return jax.shard_map(fn, in_specs=(qkv_spec, kv_spec, kv_spec, seg_spec), out_specs=qkv_spec, check_vma=False)(
        q_btnh, k_bskh, v_bskh, seg_bt)


def _splash(q_btnh, k_bskh, v_bskh, seg_bt, window):
    """One shard: splash works on (heads, seq, head_dim) per sequence, so the batch is a vmap. Off TPU the
    kernel runs in Pallas's interpreter (tests compare it with XLA on CPU; `choose` never picks it there)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, t, n, h = q_btnh.shape
    one = masks.LocalMask((t, t), (window - 1, 0), offset=0) if window else masks.CausalMask((t, t))
    block = math.gcd(t, 512)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * n), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=jax.default_backend() != "tpu")
    q_bnth = (q_btnh * (1.0 / math.sqrt(h))).swapaxes(1, 2)  # splash does not scale the scores
    k_bksh, v_bksh = k_bskh.swapaxes(1, 2), v_bskh.swapaxes(1, 2)
    if seg_bt is None:
        out = jax.vmap(kernel)(q_bnth, k_bksh, v_bksh)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
            q_bnth, k_bksh, v_bksh, seg_bt)
    return out.swapaxes(1, 2)
