"""`clt status`: the state of real smoke runs (finished, preempted, stopped), of a held lock (running), of a
run that died (interrupted), checked against what the workdir's files hold; and that it needs no jax."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import SMOKE, smoke_overrides

from clt import cli, config, train
from clt.metrics import read_jsonl
from clt.resume import WorkdirLock


@pytest.fixture(scope="module")
def finished(smoke_run, tmp_path_factory):
    """A copy of the session's finished smoke run."""
    wd = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(smoke_run[1], wd)
    return wd


@pytest.fixture(scope="module")
def preempted(demo_data, tmp_path_factory):
    wd = tmp_path_factory.mktemp("preempted")
    cfg = config.load(str(SMOKE), smoke_overrides(demo_data, "debug.preempt_at_step=9"))
    assert train.train(cfg, str(wd), progress=False)["stopped"] == "preempted"
    return wd


def status(wd, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["status", str(wd), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def text(wd, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["status", str(wd)]) == 0
    return capsys.readouterr().out


def plan_of(wd) -> dict:
    return json.loads((wd / "plan.json").read_text())["plan"]


def events(wd, name) -> list[dict]:
    return [e for e in read_jsonl(wd / "events.jsonl") if e["event"] == name]


def write_events(wd, rows) -> None:
    (wd / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_finished_run(finished, capsys):
    st = status(finished, capsys)
    plan = plan_of(finished)
    total = plan["phases"][-1]["end"]
    assert st["state"] == "finished" and st["holder"] is None and st["eta"] is None
    assert (st["step"], st["total_steps"], st["percent"]) == (total, total, 100.0)
    last = plan["phases"][-1]
    assert st["phase"] | {"phases": 0} == dict(name=last["name"], index=len(plan["phases"]) - 1, phases=0,
                                              start=last["start"], end=last["end"])
    rows = read_jsonl(finished / "metrics.jsonl")
    for d in plan["domains"]:  # each domain's newest eval, as metrics.jsonl has it
        row = [r for r in rows if f"eval/{d}/loss" in r][-1]
        assert st["evals"][d] == dict(step=row["step"], loss=row[f"eval/{d}/loss"], bpb=row[f"eval/{d}/bpb"])
    log = [r for r in rows if "loss" in r][-1]
    assert st["train"] == dict(step=log["step"], loss=log["loss"], lr=log["lr"])
    phase_ends = [e["step"] for e in events(finished, "checkpoint") if e["kind"] == "phase_end"]
    assert st["checkpoint"] == dict(step=total, kind="phase_end", source="checkpoints/")
    assert set(phase_ends) <= set(st["checkpoints"]) and st["quarantine"] == []
    out = text(finished, capsys)
    assert out.startswith(f"{finished}: finished\n") and f"step    {total}/{total} (100%)" in out
    assert f"{plan['domains'][0]} {st['evals'][plan['domains'][0]]['loss']:.4f} at step" in out
    assert "eta" not in out


def test_preempted_run(preempted, capsys):
    st = status(preempted, capsys)
    (pre,) = events(preempted, "preempted")
    assert pre["step"] == 9
    assert st["state"] == "preempted" and st["state_step"] == 9 and st["step"] == 9
    assert st["checkpoint"] == dict(step=9, kind="preempted", source="checkpoints/")  # a save with no event
    interval = [e["step"] for e in events(preempted, "checkpoint") if e["kind"] == "interval"]
    assert st["checkpoints"] == sorted(interval + [9])
    first = plan_of(preempted)["phases"][0]
    assert (st["phase"]["name"], st["phase"]["start"], st["phase"]["end"]) == (first["name"], 0, first["end"])
    out = text(preempted, capsys)
    assert out.startswith(f"{preempted}: preempted at step 9\n") and out.endswith("resumes from step 9\n")
    assert f"phase {first['name']} (1/3, steps 0-{first['end'] - 1})" in out


def test_running_while_the_lock_is_held_with_an_eta(preempted, tmp_path, capsys):
    wd = shutil.copytree(preempted, tmp_path / "run")
    rows = read_jsonl(wd / "metrics.jsonl")
    for r in rows:
        if "tokens_per_s" in r:
            r["tokens_per_s"] = 1000.0
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_of(wd)
    left = sum((p["end"] - max(p["start"], 9)) * p["batch_size"] for p in plan["phases"]) * plan["seq_len"]
    lock = WorkdirLock(wd).acquire()
    try:
        st = status(wd, capsys)
        assert st["state"] == "running"  # the lock wins over the preempted event still in the files
        assert st["holder"]["pid"] == os.getpid()
        assert st["eta"]["seconds"] == pytest.approx(left / 1000.0)
        assert st["eta"]["seconds_per_step"] == pytest.approx(plan["phases"][0]["batch_size"] * plan["seq_len"] / 1e3)
        out = text(wd, capsys)
        assert f"running (pid {os.getpid()} on " in out and "eta     ~" in out
    finally:
        lock.release()
    assert status(wd, capsys)["state"] == "preempted"  # released: nobody runs it


def test_stopped_run_and_a_resume_after_it(demo_data, tmp_path, capsys):
    cfg = config.load(str(SMOKE), smoke_overrides(
        demo_data, "monitor.gap_alert=1e-9", "monitor.on_alert='stop'", "phases.shift.replay=0.0",
        "phases.shift.schedule.peak=1e-2"))
    with pytest.raises(train.StopRun) as stop:
        train.train(cfg, str(tmp_path), progress=False)
    st = status(tmp_path, capsys)
    (stopped,) = events(tmp_path, "stopped")
    alerts = events(tmp_path, "alert")
    assert st["state"] == "stopped" and st["reason"] == stopped["reason"] == str(stop.value)
    assert st["state_step"] == stopped["step"] == st["checkpoint"]["step"]
    assert st["alerts"]["count"] == len(alerts) >= 1
    assert st["alerts"]["last"][-1] == dict(step=alerts[-1]["step"], message=alerts[-1]["message"])
    out = text(tmp_path, capsys)
    assert f"stopped at step {stopped['step']}: {stopped['reason']}" in out and alerts[-1]["message"] in out
    # a `clt train` that resumed it and then died leaves the run interrupted, not stopped
    write_events(tmp_path, read_jsonl(tmp_path / "events.jsonl") + [dict(event="resume", step=stopped["step"])])
    assert status(tmp_path, capsys)["state"] == "interrupted"


def test_interrupted_when_nothing_ended_the_run(preempted, tmp_path, capsys):
    wd = shutil.copytree(preempted, tmp_path / "run")
    write_events(wd, [e for e in read_jsonl(wd / "events.jsonl") if e["event"] != "preempted"])
    st = status(wd, capsys)
    assert st["state"] == "interrupted" and st["step"] == 9  # the checkpoint folder 9 counts as progress
    assert st["checkpoint"] == dict(step=9, kind=None, source="checkpoints/")
    out = text(wd, capsys)
    assert "interrupted (not running" in out and out.endswith("resumes from step 9\n")


def test_finished_needs_the_last_step_and_quarantine_is_not_a_checkpoint(finished, tmp_path, capsys):
    wd = shutil.copytree(finished, tmp_path / "run")
    total = plan_of(wd)["phases"][-1]["end"]
    shutil.rmtree(wd / "checkpoints" / str(total))
    (wd / "checkpoints" / "quarantine" / f"{total}-nonfinite").mkdir(parents=True)
    (wd / "checkpoints" / f"{total}.orbax-checkpoint-tmp-1234").mkdir()  # a save cut short
    kept = [e for e in read_jsonl(wd / "events.jsonl")
            if not (e["event"] in ("checkpoint", "finished") and e["step"] == total)]
    write_events(wd, kept)
    st = status(wd, capsys)
    assert st["state"] == "interrupted" and total not in st["checkpoints"]
    assert st["quarantine"] == [f"{total}-nonfinite"] and st["checkpoint"]["step"] < total
    assert f"quarantined (damaged, never restored): {total}-nonfinite" in text(wd, capsys)
    write_events(wd, kept + [dict(event="finished", step=total)])
    assert status(wd, capsys)["state"] == "finished"


def test_a_folder_without_plan_json_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"clt: error: WORKDIR = {str(tmp_path)!r}: not a clt workdir (no plan.json); "
                   "give the --workdir of a clt run\n")


def test_status_imports_no_jax_or_orbax(finished):
    code = ("import sys; from clt.cli import main; assert main(['status', sys.argv[1]]) == 0; "
            "print([m for m in ('jax', 'orbax', 'flax', 'optax', 'grain', 'tensorstore') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(finished)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.stdout.strip().splitlines()[-1] == "[]"
