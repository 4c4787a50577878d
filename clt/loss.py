"""Next-token cross-entropy: the one loss that training and evaluation share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_blv: jax.Array, targets_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood per token [B, L], log partition log Z per token [B, L]) in float32.

    log Z is returned so the trainer can add a z-loss without a second logsumexp."""
    logits_blv = logits_blv.astype(jnp.float32)
    logz_bl = jax.nn.logsumexp(logits_blv, axis=-1)
    target_logit_bl = jnp.take_along_axis(logits_blv, targets_bl[..., None], axis=-1)[..., 0]
    return logz_bl - target_logit_bl, logz_bl
