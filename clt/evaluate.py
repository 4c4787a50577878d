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

from clt.config import ConfigError
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
        if available < 1:  # a sequence reads seq_len + 1 tokens: the longest that fits is num_tokens - 1
            longest = shard.num_tokens - 1
            more = "prepare more eval text (a larger clt prepare --eval-fraction)"
            raise ConfigError("data.seq_len", seq_len, f"longer than the eval split of domain {d!r} allows: its "
                              f"{shard.num_tokens} tokens hold sequences of at most seq_len {max(longest, 0)}",
                              f"set data.seq_len <= {longest}, or {more}" if longest >= 1 else more)
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


# ----------------------------------------------------------------------------------------------------------
# User tasks: multiple-choice accuracy (the stability gap was first measured on downstream accuracy).
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceTask:
    """A JSONL file of {"context": str, "choices": [str, ...], "answer": int}, one item per line. Each
    (item, choice) is one row: context then choice, scored by the choice tokens' summed log-probability."""

    name: str
    tokens: np.ndarray
    """int32 [rows, seq_len + 1], left-truncated context + choice, right-padded."""
    mask: np.ndarray
    """float32 [rows, seq_len]: 1 on the positions that predict a choice token."""
    item: np.ndarray
    """int [rows]: the item of each row (-1 for padding rows)."""
    answers: np.ndarray
    choice_bytes: np.ndarray
    """UTF-8 bytes of each row's choice, for the length-normalised accuracy."""


def load_choice_task(path: str, tokenizer, seq_len: int, eval_batch: int) -> ChoiceTask:
    """Read and tokenise a multiple-choice JSONL file; bad lines are errors naming the line."""
    import json
    import pathlib

    from clt.config import ConfigError

    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError("monitor.tasks", path, "no such task file", "give a JSONL of context/choices/answer items")
    rows, masks, items, answers, nbytes = [], [], [], [], []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            context, choices, answer = obj["context"], list(obj["choices"]), int(obj["answer"])
            assert 0 <= answer < len(choices) and len(choices) >= 2
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ConfigError("monitor.tasks", f"{path}:{n}", "not a multiple-choice item",
                              'each line is {"context": "...", "choices": ["a", "b"], "answer": 0}') from None
        ctx = np.asarray(tokenizer.encode(context), np.int64)
        for choice in choices:
            ch = np.asarray(tokenizer.encode(choice), np.int64)[: seq_len]
            seq = np.concatenate([ctx, ch])[-(seq_len + 1):]
            row = np.zeros(seq_len + 1, np.int32)
            row[: len(seq)] = seq
            mask = np.zeros(seq_len, np.float32)
            mask[len(seq) - len(ch) - 1: len(seq) - 1] = 1  # positions whose next token is a choice token
            rows.append(row), masks.append(mask), items.append(len(answers)), nbytes.append(len(choice.encode()))
        answers.append(answer)
    if not answers:
        raise ConfigError("monitor.tasks", path, "the task file has no items", "add JSONL lines")
    pad = -len(rows) % eval_batch
    rows += [np.zeros(seq_len + 1, np.int32)] * pad
    masks += [np.zeros(seq_len, np.float32)] * pad
    items += [-1] * pad
    nbytes += [1] * pad
    return ChoiceTask(file.stem, np.stack(rows), np.stack(masks), np.asarray(items), np.asarray(answers),
                      np.asarray(nbytes, np.float64))


def make_score_step(graphdef: nnx.GraphDef) -> Callable:
    """jit(params, tokens, mask) -> summed log-probability of the masked next tokens, per row."""

    def step(params, tokens, mask):
        nll, _ = token_nll(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])
        return -(nll * mask).sum(axis=-1)

    return jax.jit(step)


def evaluate_task(score_step: Callable, params, task: ChoiceTask, eval_batch: int,
                  put: Callable[[np.ndarray], jax.Array]) -> dict[str, float]:
    """`eval/task/<name>/acc` (highest summed log-prob) and `acc_norm` (per byte of the choice)."""
    scores = np.concatenate([np.asarray(score_step(params, put(task.tokens[i:i + eval_batch]),
                                                   put(task.mask[i:i + eval_batch])))
                             for i in range(0, len(task.tokens), eval_batch)])
    acc = acc_norm = 0
    for i, answer in enumerate(task.answers):
        rows = np.flatnonzero(task.item == i)
        acc += int(np.argmax(scores[rows]) == answer)
        acc_norm += int(np.argmax(scores[rows] / task.choice_bytes[rows]) == answer)
    n = len(task.answers)
    return {f"eval/task/{task.name}/acc": acc / n, f"eval/task/{task.name}/acc_norm": acc_norm / n}
