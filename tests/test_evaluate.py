"""Evaluation: held-out bits per byte, multiple-choice tasks, and alerts that stop a run with a checkpoint."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config
from flax import nnx

from clt import checkpoint, config, sharding, train
from clt import step as step_lib
from clt.config import ConfigError
from clt.data.shards import DomainData
from clt.data.tokenizer import ByteTokenizer
from clt.evaluate import evaluate_task, load_choice_task, make_score_step
from clt.metrics import read_jsonl
from clt.optim import make_optimizer


# ----------------------------------------------------------------------------------------------------------
# The train state and step of clt.step, built as `clt train` builds them. Only these helpers touch its API.
# ----------------------------------------------------------------------------------------------------------
def seed_model(dims, mesh):
    """(graphdef, params) of the seed-0 model created into its shards on `mesh`."""
    return nnx.split(step_lib.create_model(dims, mesh, seed=0, dtype=jnp.float32))


def layout(cfg, mesh):
    """(graphdef, abstract train state, its shardings) of `cfg`'s model on `mesh`, as clt train lays it out."""
    data = {d: DomainData(p) for d, p in cfg.data.domains}
    dims = step_lib.model_dims(cfg, max(d.vocab_size for d in data.values()))
    graphdef, _, abstract, state_sh = step_lib.state_layout(dims, mesh, make_optimizer(cfg.optim), seed=cfg.seed,
                                                            dtype=jnp.float32)
    return graphdef, abstract, state_sh


def params_of(state):
    return state.params


# ----------------------------------------------------------------------------------------------------------
def write_task(path, items):
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return str(path)


def test_choice_task_rows_and_masks(tmp_path):
    f = write_task(tmp_path / "t.jsonl", [dict(context="ab", choices=["c", "de"], answer=1)])
    task = load_choice_task(f, ByteTokenizer(), seq_len=8, eval_batch=4)
    assert task.tokens.shape == (4, 9) and task.item.tolist() == [0, 0, -1, -1]
    # row 1 is "a b d e": positions 1 and 2 predict the choice tokens "d" and "e"
    assert task.tokens[1, :4].tolist() == [ord("a"), ord("b"), ord("d"), ord("e")]
    assert task.mask[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert task.mask[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def test_task_accuracy_follows_the_model_scores(tmp_path):
    """A model whose logits favour one byte picks the choice made of it: accuracy 1 when the answer is that
    choice, 0 when it is not."""
    f_right = write_task(tmp_path / "r.jsonl", [dict(context="xx", choices=["aaa", "zzz"], answer=0)] * 3)
    f_wrong = write_task(tmp_path / "w.jsonl", [dict(context="xx", choices=["aaa", "zzz"], answer=1)] * 3)
    mesh = sharding.make_mesh(config.MeshConfig(data=-1))
    dims = step_lib.resolve_dims(config.ModelConfig(preset="tiny"), 256)
    graphdef, params = seed_model(dims, mesh)
    embed = params["embed"]
    table = np.zeros(embed[...].shape, np.float32)
    table[ord("a")] = 5.0  # tied output embedding: every position's logit for "a" is large
    embed[...] = jax.device_put(table, embed[...].sharding)
    score = make_score_step(graphdef)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh) if x.ndim == 2 else  # noqa: E731
                                   jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    with sharding.use_mesh(mesh):
        right = evaluate_task(score, params, load_choice_task(f_right, ByteTokenizer(), 16, 8), 8, put)
        wrong = evaluate_task(score, params, load_choice_task(f_wrong, ByteTokenizer(), 16, 8), 8, put)
    assert right["eval/task/r/acc"] == 1.0 and wrong["eval/task/w/acc"] == 0.0


def test_bad_task_line_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "answer": 0}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2.*not a multiple-choice item"):
        load_choice_task(str(f), ByteTokenizer(), 8, 4)


QUIZ = [  # answers on both sides, choices of different lengths: acc and acc_norm are not fixed by the layout
    dict(context="def f(x):\n    return", choices=[" x", " the"], answer=0),
    dict(context="import ", choices=["os", "the cat sat"], answer=0),
    dict(context="The quick brown", choices=[" fox", " def"], answer=0),
    dict(context="for i in", choices=[" the", " range(10):"], answer=1),
    dict(context="class Foo", choices=[" and", "(object):"], answer=1),
    dict(context="    if x is None:\n        ", choices=["))]", "return"], answer=1),
]


def independent_task_scores(graphdef, params, items, seq_len):
    """Accuracy and per-byte accuracy of a task, scored row by row without clt.evaluate: each choice's tokens
    summed log-probability after its context (float64 log-softmax of the model's logits)."""
    tok = ByteTokenizer()
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    acc = acc_norm = 0
    margins = []
    for item in items:
        ctx = [int(t) for t in tok.encode(item["context"])]
        scores = []
        for choice in item["choices"]:
            ch = [int(t) for t in tok.encode(choice)]
            seq = np.asarray(ctx + ch, np.int32)
            assert len(seq) <= seq_len + 1  # no truncation in this quiz
            x = np.zeros((1, seq_len), np.int32)
            x[0, : len(seq) - 1] = seq[:-1]
            logits = np.asarray(forward(params, jnp.asarray(x))[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            positions = np.arange(len(ctx) - 1, len(seq) - 1)  # the positions whose next token is a choice token
            scores.append(logp[positions, seq[positions + 1]].sum())
        scores = np.array(scores)
        per_byte = scores / np.array([len(c.encode()) for c in item["choices"]])
        acc += int(np.argmax(scores) == item["answer"])
        acc_norm += int(np.argmax(per_byte) == item["answer"])
        margins += [np.ptp(scores), np.ptp(per_byte)]
    return acc / len(items), acc_norm / len(items), min(margins)


def test_tasks_and_bpb_are_logged_during_training(demo_data, tmp_path):
    """A 9-step smoke run with a task: the accuracies logged at the final step are the task scored
    independently with the params checkpointed at that step (catches scores of the wrong positions or params,
    a wrong argmax or normalisation, acc and acc_norm swapped); bpb is the loss over ln 2 and bytes per token."""
    f = write_task(tmp_path / "quiz.jsonl", QUIZ)
    cfg = smoke_config(demo_data, f"monitor.tasks=({f!r},)", "phases.base.steps=4", "phases.shift.steps=3",
                       "phases.anneal.steps=2")
    train.train(cfg, str(tmp_path / "run"), progress=False)
    evals = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/prose/loss" in r}
    assert 0 in evals and 9 in evals and all("eval/task/quiz/acc" in r for r in evals.values())

    mesh = sharding.make_mesh(config.MeshConfig(data=1), jax.devices()[:1])
    graphdef, abstract, state_sh = layout(cfg, mesh)
    store = checkpoint.CheckpointStore(tmp_path / "run" / "checkpoints", cfg.checkpoint, read_only=True)
    params = params_of(store.restore(9, abstract, state_sh))  # the final eval and the final save: one state
    store.close()
    acc, acc_norm, margin = independent_task_scores(graphdef, params, QUIZ, cfg.data.seq_len)
    assert margin > 1e-4  # no near-tie that float rounding could flip (measured: 0.05)
    assert (evals[9]["eval/task/quiz/acc"], evals[9]["eval/task/quiz/acc_norm"]) == (acc, acc_norm)  # 2/6, 1/6

    # bits per byte = nats per token / ln 2 / bytes per token (the byte tokenizer's EOS has no bytes)
    bpt = DomainData(demo_data / "prose").eval.bytes_per_token
    r = evals[9]
    assert r["eval/prose/bpb"] == pytest.approx(r["eval/prose/loss"] / math.log(2) / bpt)


def test_alert_with_on_alert_stop_ends_the_run_with_a_checkpoint(demo_data, tmp_path):
    # any rise of a domain's loss inside a switch window is an alert (which switch first shows one depends on
    # the tiny model); the run must stop right there, with a checkpoint of that step
    cfg = smoke_config(
        demo_data, "monitor.gap_alert=1e-9", "monitor.on_alert='stop'", "phases.shift.replay=0.0",
        "phases.shift.schedule.peak=1e-2")
    with pytest.raises(train.StopRun, match=r"stability gap [0-9.]+ > 1e-09 on (prose|code) after the \w+ switch at "
                                            r"step \d+"):
        train.train(cfg, str(tmp_path), progress=False)
    events = read_jsonl(tmp_path / "events.jsonl")
    alert = next(e for e in events if e["event"] == "alert")
    stopped = next(e for e in events if e["event"] == "stopped")
    assert alert["alert"] == "gap" and stopped["step"] == alert["step"]
    store = checkpoint.CheckpointStore(tmp_path / "checkpoints", cfg.checkpoint, read_only=True)
    assert store.latest_step() == alert["step"]
    store.close()
