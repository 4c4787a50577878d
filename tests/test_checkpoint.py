"""Checkpoints: bit-exact resume after preemption, damaged checkpoints, changed plans, init_from, resharding."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE, smoke_config

from clt import checkpoint, config, resume, sharding, train
from clt import step as step_lib
from clt.config import ConfigError
from clt.metrics import TIMING_FIELDS, read_jsonl
from clt.optim import make_optimizer

TIMING = TIMING_FIELDS  # measured by the clock: the only fields identical runs may disagree on


# ----------------------------------------------------------------------------------------------------------
# The train state of clt.step, built as `clt train` builds it.
# ----------------------------------------------------------------------------------------------------------
def _state_on(mesh, seed=0):
    """(fresh train state of the tiny model on `mesh`, its abstract state, its shardings)."""
    dims = step_lib.resolve_dims(config.ModelConfig(preset="tiny"), 256)
    tx = make_optimizer(config.OptimConfig())
    _, params, abstract, shardings = step_lib.state_layout(dims, mesh, tx, seed=seed, dtype=jnp.float32)
    return step_lib.init_state(params, tx, shardings), abstract, shardings


# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smoke_run):
    """The session's uninterrupted smoke run (read-only: tests that train on from it copy it)."""
    return smoke_run[1]


def final_arrays(wd, step=28):
    store = checkpoint.CheckpointStore(wd / "checkpoints", config.CheckpointConfig(), read_only=True)
    state = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    store.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def comparable_metrics(wd):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(wd / "metrics.jsonl")]


def comparable_events(wd):
    """Events of the run itself: what a restart adds (resume, preempted, quarantine... records, times) left out."""
    return [{k: v for k, v in e.items() if k != "time"} for e in read_jsonl(wd / "events.jsonl")
            if e["event"] not in resume.HISTORY_EVENTS]


def assert_same_run(a, b):
    assert comparable_metrics(a) == comparable_metrics(b)
    assert comparable_events(a) == comparable_events(b)  # stability events too: none lost, none repeated
    for x, y in zip(final_arrays(a), final_arrays(b), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("preempt_at", [9, 12])  # mid-phase, and at the base -> shift boundary
def test_preempted_run_resumes_bit_exact(demo_data, reference, tmp_path, preempt_at):
    cfg = smoke_config(demo_data)
    preempted = smoke_config(demo_data, f"debug.preempt_at_step={preempt_at}")
    first = train.train(preempted, str(tmp_path), progress=False)
    assert first["stopped"] == "preempted" and first["final_step"] == preempt_at
    assert checkpoint.CheckpointStore(tmp_path / "checkpoints", cfg.checkpoint).latest_step() == preempt_at
    train.train(cfg, str(tmp_path), progress=False)
    assert_same_run(reference, tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert {"event": "resume", "step": preempt_at} in [{k: e[k] for k in ("event", "step")} for e in events
                                                        if e["event"] == "resume"]


def test_damaged_checkpoint_is_skipped(demo_data, reference, tmp_path, caplog):
    preempted = smoke_config(demo_data, "debug.preempt_at_step=10")
    train.train(preempted, str(tmp_path), progress=False)  # checkpoints at 8 (interval) and 10 (preemption)
    state_dir = tmp_path / "checkpoints" / "10" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"")  # truncate the array data, as a kill mid-copy would
    train.train(smoke_config(demo_data), str(tmp_path), progress=False)
    assert "checkpoint 10 is damaged" in caplog.text and "trying the previous one" in caplog.text
    assert [p.name for p in (tmp_path / "checkpoints" / "quarantine").iterdir()] == ["10-metadata"]
    assert_same_run(reference, tmp_path)


def raw_smoke(demo_data):
    raw = config.load_raw(str(SMOKE))
    raw["data"]["domains"] = {"prose": str(demo_data / "prose"), "code": str(demo_data / "code")}
    return raw


def test_appending_a_phase_continues_a_finished_run(demo_data, reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    raw = raw_smoke(demo_data)
    raw["phases"] = raw["phases"] + (dict(name="next_month", steps=4, mixture={"code": 0.5, "prose": 0.5},
                                          schedule=dict(kind="constant", peak=1e-4)),)
    result = train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False)
    assert result["final_step"] == 32
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r for r in rows if r["step"] < 28 and "loss" in r] == [r for r in read_jsonl(reference / "metrics.jsonl")
                                                                  if r["step"] < 28 and "loss" in r]


def test_editing_a_phase_that_ran_is_an_error_unless_accepted(demo_data, reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    raw = raw_smoke(demo_data)
    raw["phases"] = (dict(raw["phases"][0], mixture={"prose": 0.5, "code": 0.5}),) + raw["phases"][1:]
    raw["phases"] = raw["phases"] + (dict(name="extra", steps=2, mixture={"code": 1.0}),)
    with pytest.raises(ConfigError, match=r"phases\.base\.mixture.*already ran.*--accept-changed-past"):
        train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False)
    result = train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False, accept_changed_past=True)
    assert result["final_step"] == 30


def test_changed_data_of_a_past_domain_is_an_error(demo_data, reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    shutil.copytree(demo_data / "prose", tmp_path / "prose2")
    with open(tmp_path / "prose2" / "train" / "index.json", "r+") as f:  # same layout, different contents
        text = f.read().replace('"sha256": "', '"sha256": "0')
        f.seek(0), f.write(text), f.truncate()
    raw = raw_smoke(demo_data)
    raw["data"]["domains"]["prose"] = str(tmp_path / "prose2")
    raw["phases"] = raw["phases"] + (dict(name="extra", steps=2, mixture={"code": 1.0}),)
    with pytest.raises(ConfigError, match=r"data\.domains\.prose.*changed since phase 'base'"):
        train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False)


def test_init_from_takes_weights_with_fresh_optimizer_and_step(demo_data, reference, tmp_path):
    cfg = smoke_config(demo_data, "debug.preempt_at_step=2")
    train.train(cfg, str(tmp_path), init_from=f"ckpt:{reference}@12", progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    ref = {r["step"]: r for r in read_jsonl(reference / "metrics.jsonl") if "eval/prose/loss" in r}
    assert rows[0]["step"] == 0 and rows[0]["eval/prose/loss"] == pytest.approx(ref[12]["eval/prose/loss"], rel=1e-6)
    store = checkpoint.CheckpointStore(tmp_path / "checkpoints", cfg.checkpoint, read_only=True)
    meta = store.meta(2)
    state = store.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    store.close()
    assert int(np.asarray(state["step"])) == 2 and int(np.asarray(state["opt_state"]["count"])) == 2
    assert meta["init_from"] == f"ckpt:{reference}@12"
    # the same command resumes from the run's own checkpoints; another init_from is refused
    with pytest.raises(ConfigError, match=r"started from"):
        train.train(cfg, str(tmp_path), init_from=f"ckpt:{reference}@22", progress=False)


@pytest.mark.parametrize("target", [dict(n=1, data=1, fsdp=1, tensor=1), dict(n=2, data=1, fsdp=1, tensor=2),
                                    dict(n=4, data=1, fsdp=4, tensor=1), dict(n=4, data=2, fsdp=1, tensor=2)])
def test_restore_onto_another_mesh_and_back(tmp_path, target):
    big = sharding.make_mesh(config.MeshConfig(data=1, fsdp=4, tensor=2))
    state, _, _ = _state_on(big)
    store = checkpoint.CheckpointStore(tmp_path / "a", config.CheckpointConfig())
    store.save(1, state, meta={})
    store.wait()
    small = sharding.make_mesh(config.MeshConfig(data=target["data"], fsdp=target["fsdp"], tensor=target["tensor"]),
                               jax.devices()[:target["n"]])
    _, abstract, small_sh = _state_on(small, seed=1)
    restored = store.restore(1, abstract, small_sh)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for arr, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(small_sh)):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)
    # and back onto the 8-device mesh
    back_store = checkpoint.CheckpointStore(tmp_path / "b", config.CheckpointConfig())
    back_store.save(1, restored, meta={})
    back_store.wait()
    _, abstract_big, big_sh = _state_on(big, seed=2)
    back = back_store.restore(1, abstract_big, big_sh)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    store.close(), back_store.close()


def test_ckpt_ls_lists_phase_ends_and_interval_checkpoints(reference, capsys):
    from clt.cli import main

    assert main(["ckpt", "ls", str(reference)]) == 0
    out = capsys.readouterr().out
    for step in ("12", "22", "28"):  # phase ends are kept beyond keep=2
        assert f"\n{step} " in out
    assert main(["ckpt", "info", str(reference), "--step", "12"]) == 0
    assert '"phase": "base"' in capsys.readouterr().out


def test_a_new_domain_for_the_next_phase_is_accepted(demo_data, reference, tmp_path):
    """Next month's data arrives as a new domain. Its name sorts between the existing ones, so domain indices
    shift; the past must read as unchanged and the rows already trained must be the same."""
    shutil.copytree(reference, tmp_path / "run")
    raw = raw_smoke(demo_data)
    raw["data"]["domains"] = {"code": str(demo_data / "code"), "legal": str(demo_data / "unicode"),
                              "prose": str(demo_data / "prose")}
    raw["phases"] = raw["phases"] + (dict(name="legal", steps=4, mixture={"legal": 1.0}, replay=0.25,
                                          schedule=dict(kind="constant", peak=1e-4)),)
    result = train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False)
    assert result["final_step"] == 32
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "legal" and "loss" in r]
    fresh = sum(r.get("rows/legal", 0) for r in rows)
    replayed = sum(r.get("rows/replay/prose", 0) + r.get("rows/replay/code", 0) for r in rows)
    assert fresh + replayed == 32 and replayed > 0 and fresh > replayed  # 4 steps x 8 rows, a partial block
    from clt import plan as plan_lib

    # the past phases' rows are assigned exactly as before the new domain existed
    old = plan_lib.Plan.from_json(checkpoint.CheckpointStore(reference / "checkpoints", config.CheckpointConfig(),
                                                              read_only=True).meta(28)["plan"])
    new = plan_lib.resolve(config.from_dict(raw), past=old, through_step=28)
    from clt.mixture import MixtureSchedule

    a, b = MixtureSchedule(old), MixtureSchedule(new)
    for s in (0, 13, 27):
        names_a = [old.domains[x % 2] for x in a.rows_at(s)[0]]
        names_b = [new.domains[x % 3] for x in b.rows_at(s)[0]]
        assert names_a == names_b
        np.testing.assert_array_equal(a.rows_at(s)[1], b.rows_at(s)[1])


@pytest.mark.parametrize("field,value", [("seed", 1), ("data.seq_len", 16), ("data.block_rows", 32)])
def test_changing_what_fixes_the_past_data_order_is_an_error(demo_data, reference, tmp_path, field, value):
    shutil.copytree(reference, tmp_path / "run")
    raw = raw_smoke(demo_data)
    raw["phases"] = raw["phases"] + (dict(name="extra", steps=2, mixture={"code": 1.0}),)
    raw = config.apply_overrides(raw, [f"{field}={value}"])
    with pytest.raises(ConfigError, match=rf"{field} = {value}: the run so far used .*--accept-changed-past"):
        train.train(config.from_dict(raw), str(tmp_path / "run"), progress=False)


def test_a_field_the_schedule_kind_ignores_is_not_a_change(demo_data, reference, tmp_path):
    """A plan.json from another clt version may store e.g. a cosine segment's unused `shape` differently."""
    shutil.copytree(reference, tmp_path / "run")
    store = checkpoint.CheckpointStore(tmp_path / "run" / "checkpoints", config.CheckpointConfig(), read_only=True)
    meta = store.meta(28)
    store.close()
    meta["plan"]["phases"][0]["schedule"]["shape"] = "1-sqrt"  # cosine ignores it
    from clt.data.pipeline import data_manifest, load_domains
    from clt.plan import resolve
    from clt.resume import check_resume_plan

    cfg = config.from_dict(raw_smoke(demo_data))
    manifest = data_manifest(cfg, load_domains(cfg))
    check_resume_plan(cfg, resolve(cfg), meta, 28, manifest)  # accepted
    meta["plan"]["phases"][0]["schedule"]["end"] = 1e-6  # cosine reads it
    with pytest.raises(ConfigError, match=r"phases\.base\.schedule\.end.*already ran"):
        check_resume_plan(cfg, resolve(cfg), meta, 28, manifest)
