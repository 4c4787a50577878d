"""Evaluation: held-out bits per byte, multiple-choice tasks, and alerts that stop a run with a checkpoint."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_overrides
from flax import nnx

from clt import checkpoint, config, sharding, train
from clt.config import ConfigError
from clt.data.tokenizer import ByteTokenizer
from clt.evaluate import evaluate_task, load_choice_task, make_score_step
from clt.metrics import read_jsonl
from clt.model import resolve_dims


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
    dims = resolve_dims(config.ModelConfig(preset="tiny"), 256)
    graphdef, params = nnx.split(sharding.create_model(dims, mesh, seed=0, dtype=jnp.float32))
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


def test_tasks_and_bpb_are_logged_during_training(demo_data, tmp_path):
    f = write_task(tmp_path / "quiz.jsonl", [dict(context="def f(x):\n    return", choices=[" x", " the"],
                                                  answer=0)] * 2)
    cfg = config.load("configs/smoke.py", smoke_overrides(demo_data, f"monitor.tasks=({f!r},)",
                                                          "debug.preempt_at_step=7"))
    train.train(cfg, str(tmp_path / "run"), progress=False)
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/prose/loss" in r]
    assert all(0 <= r["eval/task/quiz/acc"] <= 1 for r in evals) and len(evals) >= 2
    # bits per byte = nats per token / ln 2 / bytes per token (the byte tokenizer's EOS has no bytes)
    from clt.data.shards import DomainData

    bpt = DomainData(demo_data / "prose").eval.bytes_per_token
    r = evals[-1]
    assert r["eval/prose/bpb"] == pytest.approx(r["eval/prose/loss"] / math.log(2) / bpt)


def test_alert_with_on_alert_stop_ends_the_run_with_a_checkpoint(demo_data, tmp_path):
    # any rise of a domain's loss inside a switch window is an alert (which switch first shows one depends on
    # the tiny model); the run must stop right there, with a checkpoint of that step
    cfg = config.load("configs/smoke.py", smoke_overrides(
        demo_data, "monitor.gap_alert=1e-9", "monitor.on_alert='stop'", "phases.shift.replay=0.0",
        "phases.shift.schedule.peak=1e-2"))
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
