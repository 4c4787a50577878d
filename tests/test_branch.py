"""The infinite schedule's branch anneal: a release checkpoint, then the next phase continues from before it."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clt import checkpoint, config, train
from clt.metrics import TIMING_FIELDS, read_jsonl

INF = dict(kind="infinite", warmup=2, peak=3e-3, const=1e-3, end=1e-4, cooldown=4)


def branch_cfg(demo_data, **debug):
    domains = {"prose": str(demo_data / "prose"), "code": str(demo_data / "code")}
    return config.from_dict(dict(
        model=dict(preset="tiny"), batch_size=8, debug=debug,
        data=dict(domains=domains, seq_len=32, block_rows=64, eval_sequences=8, eval_batch=8),
        monitor=dict(every=4, dense_every=2, dense_window=4), log=dict(every=2),
        phases=(dict(name="task1", steps=12, mixture={"prose": 1.0}, schedule=dict(INF, anneal=4, branch=True)),
                dict(name="task2", steps=6, mixture={"code": 1.0}, schedule=INF))))


def state_at(directory, step):
    store = checkpoint.CheckpointStore(directory, config.CheckpointConfig(), read_only=True)
    state = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    store.close()
    return state


def leaves(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def branched(demo_data, tmp_path_factory):
    wd = tmp_path_factory.mktemp("branch")
    train.train(branch_cfg(demo_data), str(wd), progress=False)
    return wd


def test_release_holds_the_anneal_and_the_next_phase_starts_from_before_it(branched):
    wd = branched
    released, at_end, at_anneal_start = (state_at(wd / "releases" / "task1", 12), state_at(wd / "checkpoints", 12),
                                         state_at(wd / "checkpoints", 8))
    assert leaves(at_end["params"]) == leaves(at_anneal_start["params"])  # rewound to the branch point
    assert leaves(at_end["opt_state"]) == leaves(at_anneal_start["opt_state"])
    assert int(np.asarray(at_end["step"])) == 12 and int(np.asarray(at_anneal_start["step"])) == 8
    assert leaves(released["params"]) != leaves(at_end["params"])  # the release is the annealed model
    rows = read_jsonl(wd / "metrics.jsonl")
    assert any("release/eval/prose/loss" in r and r["step"] == 12 for r in rows)
    # the anneal ran (LR decays towards `end`), then task2 continues at const: no re-warm
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[9] < 1e-3 and lrs[11] < lrs[9]
    assert all(lrs[s] == pytest.approx(1e-3) for s in lrs if s >= 12)
    # the anneal's steps are discarded by the rewind, not skipped: no row may report skipped updates
    assert not any(r.get("skipped_total") for r in rows)


def test_resume_inside_the_branch_anneal_is_bit_exact(demo_data, branched, tmp_path):
    train.train(branch_cfg(demo_data, preempt_at_step=10), str(tmp_path), progress=False)
    train.train(branch_cfg(demo_data), str(tmp_path), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_FIELDS | {"time"}} for r in rows  # noqa: E731
                          if r.get("event") not in ("resume", "preempted")]
    assert strip(read_jsonl(tmp_path / "metrics.jsonl")) == strip(read_jsonl(branched / "metrics.jsonl"))
    assert strip(read_jsonl(tmp_path / "events.jsonl")) == strip(read_jsonl(branched / "events.jsonl"))
    assert leaves(state_at(tmp_path / "checkpoints", 18)) == leaves(state_at(branched / "checkpoints", 18))
    assert leaves(state_at(tmp_path / "releases" / "task1", 12)) == leaves(state_at(branched / "releases" / "task1", 12))
