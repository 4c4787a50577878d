"""The train state and the update: a typed `TrainState`, the model built into its shards, `train_step`.

Everything here is a pure function of its inputs, jitted once per run: the LR is `lr_at(plan, step)` from
clt's own step (never optax's count, which a changed plan would leave stale), and the spike guard's
statistics live in the state, so a resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from clt import attention, sharding
from clt.config import Config, ConfigError, ModelConfig, OptimConfig
from clt.loss import token_nll
from clt.model import PRESETS, VOCAB_MULTIPLE, ModelDims, Transformer
from clt.optim import with_lr
from clt.plan import Plan, resolve
from clt.schedule import lr_at

SPIKE_WARMUP = 20
"""Good steps (since the last switch) before the loss running mean is trusted to flag spikes."""
EMA_DECAY = 0.98
"""The loss running mean's decay per good step."""

_REQUIRED_DIMS = ("d_model", "n_layers", "n_heads", "d_ff")
_SWITCHES = ("norm_eps", "qkv_bias", "qk_norm", "rope_scaling", "rope_factor", "rope_low_freq_factor",
             "rope_high_freq_factor", "rope_original_context", "sliding_window")
"""ModelDims fields the config gives directly (no preset supplies them)."""


@struct.dataclass
class TrainState:
    """What a checkpoint holds; everything else (LR, data order, replay) is recomputed from (plan, step).

    Orbax stores it as a dict of these fields, so checkpoints read the same whether written from this class
    or from the plain dicts of earlier clt versions."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    """Updates applied (int32); the step that comes next."""
    loss_ema: jax.Array
    """Running mean of the loss since the last switch (the spike guard's reference)."""
    ema_count: jax.Array
    """Good steps in that mean; spikes are flagged only after SPIKE_WARMUP of them."""
    skips: jax.Array
    """Consecutive skipped updates; `optim.max_skips` of them stop the run."""
    skipped: jax.Array
    """All skipped updates of the run."""


# ----------------------------------------------------------------------------------------------------------
# The model from the config.
# ----------------------------------------------------------------------------------------------------------
def resolve_dims(cfg: ModelConfig, vocab_size: int) -> ModelDims:
    """Preset values, overridden by cfg's explicit (non-zero, non-None) fields; vocab from cfg or the data."""
    if cfg.preset and cfg.preset not in PRESETS:
        raise ConfigError("model.preset", cfg.preset, "unknown preset",
                          f"use one of {sorted(PRESETS)} or \"\" with explicit dims")
    dims = dict(PRESETS.get(cfg.preset, {}))
    for name in (*_REQUIRED_DIMS, "n_kv_heads", "rope_theta"):
        if getattr(cfg, name) != 0:
            dims[name] = getattr(cfg, name)
    if cfg.tie_embeddings is not None:  # False is an explicit choice, not "unset"
        dims["tie_embeddings"] = cfg.tie_embeddings
    missing = [n for n in _REQUIRED_DIMS if n not in dims]
    if missing:
        raise ConfigError(f"model.{missing[0]}", 0, f"preset \"\" needs explicit dims, missing {missing}",
                          "set them, e.g. model.d_model=256, or pick a preset")
    dims.setdefault("n_kv_heads", dims["n_heads"])
    dims.setdefault("rope_theta", 10000.0)
    dims.setdefault("tie_embeddings", True)
    vocab = cfg.vocab_size if cfg.vocab_size > 0 else vocab_size
    for name, value in (("vocab_size", vocab), *((n, dims[n]) for n in (*_REQUIRED_DIMS, "n_kv_heads", "rope_theta"))):
        if value <= 0:
            raise ConfigError(f"model.{name}", value, "must be positive", "give a positive size")
    if dims["n_heads"] % dims["n_kv_heads"]:
        raise ConfigError("model.n_kv_heads", dims["n_kv_heads"],
                          f"n_heads={dims['n_heads']} is not a multiple of n_kv_heads={dims['n_kv_heads']}",
                          "use a divisor of n_heads (n_kv_heads == n_heads is plain multi-head attention)")
    head_dim = cfg.head_dim
    if not head_dim:
        if dims["d_model"] % dims["n_heads"]:
            raise ConfigError("model.n_heads", dims["n_heads"],
                              f"d_model={dims['d_model']} is not divisible by n_heads={dims['n_heads']}",
                              "use a divisor of d_model, or give model.head_dim")
        head_dim = dims["d_model"] // dims["n_heads"]
    if head_dim % 2:
        field = "model.head_dim" if cfg.head_dim else "model.n_heads"
        derived = "" if cfg.head_dim else "d_model/n_heads = "
        raise ConfigError(field, cfg.head_dim or dims["n_heads"], f"head_dim = {derived}{head_dim} is odd; RoPE "
                          "rotates pairs", "choose an even head_dim (d_model/n_heads when model.head_dim is 0)")
    return ModelDims(vocab_size=int(vocab), head_dim=head_dim, **{k: dims[k] for k in (*_REQUIRED_DIMS, "n_kv_heads")},
                     rope_theta=float(dims["rope_theta"]), tie_embeddings=bool(dims["tie_embeddings"]),
                     **{k: getattr(cfg, k) for k in _SWITCHES})


def checked_plan(cfg: Config, n_devices: int | None) -> Plan:
    """The resolved plan of `cfg` after `sharding.check_layout` for a machine (or job) of `n_devices` devices:
    what `clt plan show --devices N` and `clt launch slurm|gke` check before any device is touched."""
    resolved = resolve(cfg)
    dims = resolve_dims(cfg.model, 128)  # 128: a placeholder vocabulary; the data's is not read here
    sharding.check_layout(cfg, resolved, n_devices, dims, vocab_known=bool(cfg.model.vocab_size))
    return resolved


def model_dims(cfg: Config, data_vocab: int) -> ModelDims:
    """The run's model shape: the config's, with the data's vocabulary padded to VOCAB_MULTIPLE (a source
    model's vocabulary, from model.vocab_size, is kept: its logits stay the source's)."""
    if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size, f"smaller than the data's vocabulary {data_vocab}",
                          "raise it or set 0 to follow the data")
    return resolve_dims(cfg.model, -(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def compute_dtype(name: str) -> jnp.dtype:
    """`auto` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on accelerators."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def model_options(cfg: Config, eos_id: int, dims: ModelDims) -> dict[str, Any]:
    """The Transformer's keyword arguments besides its dims, from the config (and the tokenizer's EOS): the
    attention kernel is chosen here, for this machine and the run's shape (one-line error if it cannot run)."""
    model = cfg.model
    if model.doc_mask and eos_id < 0:
        raise ConfigError("model.doc_mask", True, "the data's tokenizer has no EOS id to split documents at",
                          "set model.doc_mask=False, or prepare the data with a tokenizer that has EOS")
    dtype = compute_dtype(model.dtype)
    kernel = attention.choose(model.attention, dtype=dtype, seq_len=cfg.data.seq_len, head_dim=dims.head_dim,
                              doc_mask=model.doc_mask, **attention.device_facts())
    return dict(dtype=dtype, param_dtype=jnp.dtype(model.param_dtype), remat=model.remat, doc_mask=model.doc_mask,
                eos_id=eos_id, attention=kernel)


def create_model(dims: ModelDims, mesh: jax.sharding.Mesh, *, seed: int, **options: Any) -> Transformer:
    """The model initialised directly into its shards: a jitted init with the rules' out_shardings, so no
    device ever holds a full replica. The same seed gives the same weights on any mesh (JAX's partitionable
    threefry draws each element independently of the layout)."""

    def init(key: jax.Array) -> nnx.State:
        return nnx.state(Transformer(dims, rngs=nnx.Rngs(key), **options))

    key = jax.random.key(seed)  # an argument, not a constant: one compiled init serves every seed
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(dims, rngs=nnx.Rngs(0), **options)))
    with sharding.use_mesh(mesh):
        state = jax.jit(init, in_shardings=sharding.replicated(mesh),
                        out_shardings=sharding.shardings_of(mesh, abstract))(key)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------------------
# The train state.
# ----------------------------------------------------------------------------------------------------------
def new_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 around `params`: a fresh optimizer state and empty loss statistics."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=tx.init(params), step=zero, loss_ema=jnp.zeros((), jnp.float32),
                      ema_count=zero, skips=zero, skipped=zero)


def state_layout(dims: ModelDims, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation, *, seed: int,
                 **options: Any) -> tuple[nnx.GraphDef, nnx.State, TrainState, TrainState]:
    """(graphdef, params, abstract train state, its shardings): the model created into its shards and the
    layout every checkpoint restore and the jitted step use."""
    graphdef, params = nnx.split(create_model(dims, mesh, seed=seed, **options))
    abstract = jax.eval_shape(functools.partial(new_state, tx=tx), params)
    return graphdef, params, abstract, sharding.shardings_of(mesh, abstract)


def init_state(params: nnx.State, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
    """A fresh train state (step 0, new optimizer) around `params`, created directly into its shardings."""
    return jax.jit(functools.partial(new_state, tx=tx), out_shardings=state_sh)(params)


def reset_optimizer(state: TrainState, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
    """The `reset` policy at a phase switch: a fresh optimizer state (moments and bias-correction count)."""
    return state.replace(opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(state.params))


# ----------------------------------------------------------------------------------------------------------
# The update.
# ----------------------------------------------------------------------------------------------------------
def loss_and_grads(params: nnx.State, tokens: jax.Array, graphdef: nnx.GraphDef, optim: OptimConfig
                   ) -> tuple[jax.Array, nnx.State]:
    """Mean next-token loss and its gradients (z-loss included in the gradients), over `grad_accum`
    micro-batches: micro-batch i takes rows i, i + A, ..., so each device keeps its own rows in each."""

    def loss_fn(p, tok):
        nll, logz = token_nll(nnx.merge(graphdef, p)(tok[:, :-1]), tok[:, 1:])
        loss = nll.mean()
        return loss + optim.z_loss * jnp.mean(logz ** 2), loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    A = optim.grad_accum
    if A == 1:
        (_, loss), grads = grad_fn(params, tokens)
        return loss, grads
    micro = tokens.reshape(tokens.shape[0] // A, A, -1).swapaxes(0, 1)

    def body(carry, tok):
        g_sum, l_sum = carry
        (_, l), g = grad_fn(params, tok)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (g_sum, l_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
    return l_sum / A, jax.tree.map(lambda g: g / A, g_sum)


def train_step(state: TrainState, tokens: jax.Array, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               plan: Plan, optim: OptimConfig) -> tuple[TrainState, dict]:
    """One update. The LR is `lr_at(plan, step)` written into the injected hyperparameters; a non-finite or
    spiking loss leaves params and moments untouched (the step still advances: its rows are consumed).

    The spike guard's statistics restart at every switch (phase start, blend, upsampling): a switch to a
    harder domain raises the loss by design (the stability gap clt measures), and a mean carried over from
    the old data would call that a spike, skip the updates and stop the run."""
    loss, grads = loss_and_grads(state.params, tokens, graphdef, optim)
    grad_norm = optax.tree.norm(grads)
    lr = lr_at(plan, state.step)
    updates, opt_state = tx.update(grads, with_lr(state.opt_state, lr), state.params)
    new_params = optax.apply_updates(state.params, updates)

    switches = np.array(sorted({s["step"] for s in plan.switches()}), np.int32)
    fresh = jnp.isin(state.step, switches) if switches.size else jnp.bool_(False)
    count = jnp.where(fresh, 0, state.ema_count)
    mean = jnp.where(fresh, 0.0, state.loss_ema)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim.spike_factor:
        ok &= ~((count >= SPIKE_WARMUP) & (loss > optim.spike_factor * mean))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    ema = jnp.where(count == 0, loss, EMA_DECAY * mean + (1 - EMA_DECAY) * loss)
    new = TrainState(params=keep(new_params, state.params), opt_state=keep(opt_state, state.opt_state),
                     step=state.step + 1, loss_ema=jnp.where(ok, ema, mean), ema_count=count + ok.astype(jnp.int32),
                     skips=jnp.where(ok, 0, state.skips + 1), skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr, skipped=~ok, skips=new.skips, skipped_total=new.skipped,
                   loss_ema=new.loss_ema)
    return new, metrics


def compile_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, plan: Plan, optim: OptimConfig,
                 state_sh: TrainState, batch_sh: jax.sharding.Sharding, repl: jax.sharding.Sharding) -> Callable:
    """`train_step` jitted with explicit shardings and the state donated (updated in place)."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, plan=plan, optim=optim)
    return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
