"""The optimizer: AdamW with decoupled weight decay and global-norm clipping, LR injected from the plan.

The learning rate is an injected hyperparameter that the train step overwrites with `lr_at(plan, step)`
every step; optax's own `count` never drives it (it is checkpointed and goes stale when a plan changes).
A phase with `optimizer="reset"` starts from `tx.init(params)`: fresh moments and bias-correction count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clt.config import OptimConfig


def _decay_mask(params):
    """Decay matrices only: norm scales (1-D) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    def chain(learning_rate):
        clip = optax.clip_by_global_norm(cfg.clip) if cfg.clip else optax.identity()
        adamw = optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            mask=_decay_mask)
        return optax.chain(clip, adamw)

    return optax.inject_hyperparams(chain)(learning_rate=0.0)


def with_lr(opt_state, lr: jax.Array):
    """The optimizer state with its injected learning rate set to `lr` (from clt's step, not optax's count)."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
