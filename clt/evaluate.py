"""Per-domain held-out evaluation: loss (nats per token) and bits per byte, on fixed eval sequences.

The eval set of a domain is `eval_sequences` sequences spread evenly over its held-out split, fixed for the
whole run, so every point of a loss curve is comparable. Bits per byte divide by the split's UTF-8 bytes per
token, which makes domains (and tokenizers) comparable: bpb = nats per token / ln 2 / bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clt.data.shards import DomainData
from clt.loss import token_nll


@dataclass(frozen=True)
class EvalSet:
    domain: str
    tokens: np.ndarray
    """int32 [n_padded, seq_len + 1]; padded to a multiple of the eval batch."""
    weights: np.ndarray
    """float32 [n_padded]: 1 for real rows, 0 for padding."""
    bytes_per_token: float


def load_eval_sets(data: Mapping[str, DomainData], domains: tuple[str, ...], seq_len: int, n_sequences: int,
                   eval_batch: int) -> dict[str, EvalSet]:
    sets = {}
    for d in domains:
        shard = data[d].eval
        available = shard.num_sequences(seq_len)
        if available < 1:
            raise ValueError(f"domain {d!r}: its eval split has fewer than {seq_len + 1} tokens; prepare more text "
                             "or raise eval_fraction")
        n = min(n_sequences, available)
        idx = np.unique(np.linspace(0, available - 1, n).astype(np.int64))
        tokens = shard.sequences(idx, seq_len)
        pad = -len(tokens) % eval_batch
        weights = np.concatenate([np.ones(len(tokens), np.float32), np.zeros(pad, np.float32)])
        tokens = np.concatenate([tokens, np.zeros((pad, seq_len + 1), np.int32)])
        sets[d] = EvalSet(d, tokens, weights, shard.bytes_per_token)
    return sets


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """jit(params, tokens, weights) -> (sum of token nll over real rows, number of real tokens)."""

    def step(params, tokens, weights):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        nll, _ = token_nll(logits, tokens[:, 1:])
        return (nll.sum(axis=-1) * weights).sum(), weights.sum() * nll.shape[-1]

    return jax.jit(step)


def evaluate(eval_step: Callable, params, sets: Mapping[str, EvalSet], eval_batch: int,
             put: Callable[[np.ndarray], jax.Array]) -> dict[str, float]:
    """`eval/<domain>/loss` and `eval/<domain>/bpb` for every eval set."""
    out = {}
    for d, es in sets.items():
        total, count = jnp.zeros(()), jnp.zeros(())
        for i in range(0, len(es.tokens), eval_batch):
            s, c = eval_step(params, put(es.tokens[i:i + eval_batch]), put(es.weights[i:i + eval_batch]))
            total, count = total + s, count + c
        loss = float(total / count)
        out[f"eval/{d}/loss"] = loss
        out[f"eval/{d}/bpb"] = loss / math.log(2) / es.bytes_per_token
    return out
