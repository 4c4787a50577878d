"""resume.py: the workdir lock, which rows a restart rewrites, and which settings changes it records."""

import json
import logging
import os
import subprocess
import sys

import pytest

from clt import resume
from clt.config import ConfigError
from clt.metrics import JsonlWriter, read_jsonl


def test_lock_is_exclusive_and_released_clean(tmp_path, caplog):
    first = resume.WorkdirLock(tmp_path).acquire()
    assert resume.lock_holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(resume.WorkdirBusy, match=f"in use by pid {os.getpid()}"):
        resume.WorkdirLock(tmp_path).acquire()  # a second open file: flock refuses it even in one process
    first.release()
    assert resume.lock_holder(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="clt"):
        resume.WorkdirLock(tmp_path).acquire().release()
    assert "took over" not in caplog.text  # a clean release leaves no pid behind to "take over"


def test_a_lock_left_by_a_killed_process_is_taken_over_with_its_pid(tmp_path, caplog):
    """SIGKILL cannot release anything in user space: the kernel drops the flock, the file keeps the pid."""
    code = ("import sys, os, signal; sys.path.insert(0, sys.argv[2]); from clt import resume; "
            "resume.WorkdirLock(sys.argv[1]).acquire(); print(os.getpid(), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), os.getcwd()], capture_output=True, text=True)
    dead_pid = int(out.stdout.split()[0])
    assert resume.lock_holder(tmp_path) is None  # nobody holds it any more
    with caplog.at_level(logging.WARNING, logger="clt"):
        lock = resume.WorkdirLock(tmp_path).acquire()
    assert f"left by pid {dead_pid}" in caplog.text
    assert json.loads((tmp_path / resume.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_restart_rewrites_exactly_what_it_writes_again(tmp_path):
    rows = [dict(step=0, loss=1.0), dict(event="phase_start", step=0), dict(event="init_from", step=0),
            dict(step=7, loss=0.5), dict(event="checkpoint", step=8), dict(step=8, **{"eval/a/loss": 2.0}),
            dict(step=8, **{"release/eval/a/loss": 2.5}), dict(event="preempted", step=10),
            dict(event="config_change", step=8, changes={}), dict(step=9, loss=0.4)]
    w = JsonlWriter(tmp_path / "metrics.jsonl")
    for r in rows:
        w.write(r)
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line torn by a kill
    resume.rewrite_run_files(tmp_path, 8)
    kept = read_jsonl(tmp_path / "metrics.jsonl")
    # before 8: everything; at 8: the checkpoint and release rows (not redone), not the eval (redone);
    # after 8: only history; the torn line is gone
    assert kept == rows[:5] + [rows[6], rows[7], rows[8]]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    resume.rewrite_run_files(tmp_path, 0)  # a restart without a checkpoint redoes step 0 too (init_from included)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [rows[7], rows[8]]


def test_settings_changes_are_listed_but_plan_and_debug_fields_are_not():
    old = dict(optim=dict(weight_decay=0.1, clip=1.0), monitor=dict(every=50), phases=({"name": "a"},),
               debug=dict(preempt_at_step=-1), data=dict(domains={"a": "x"}, eval_batch=16), model=dict(init_from=""))
    new = dict(optim=dict(weight_decay=0.05, clip=1.0), monitor=dict(every=50), phases=({"name": "b"},),
               debug=dict(preempt_at_step=9), data=dict(domains={"a": "x", "b": "y"}, eval_batch=8),
               model=dict(init_from="ckpt:z"))
    assert resume.config_changes(old, new) == {"optim.weight_decay": [0.1, 0.05], "data.eval_batch": [16, 8],
                                               "data.domains": [{"a": "x"}, {"a": "x", "b": "y"}]}
    # A field clt gained after the checkpoint was written (absent from its record) is a change only when this run
    # sets it to something other than its default.
    assert resume.config_changes(old, dict(old, model=dict(init_from="", attention="auto"))) == {}
    assert resume.config_changes(old, dict(old, model=dict(init_from="", attention="xla"))) == {
        "model.attention": [None, "xla"]}


def test_truncate_from_drops_rows_at_or_after_the_step_unless_kept(tmp_path):
    w = JsonlWriter(tmp_path / "e.jsonl")
    for row in (dict(step=3, event="a"), dict(step=5, event="checkpoint"), dict(step=5, event="phase_start"),
                dict(step=7, event="preempted"), dict(step=8, event="b")):
        w.write(row)
    w.close()
    resume.truncate_from(tmp_path / "e.jsonl", 5, keep=lambda r: r["event"] in ("checkpoint", "preempted"))
    assert [r["event"] for r in read_jsonl(tmp_path / "e.jsonl")] == ["a", "checkpoint", "preempted"]
    resume.truncate_from(tmp_path / "e.jsonl", 4)
    assert [r["event"] for r in read_jsonl(tmp_path / "e.jsonl")] == ["a"]


def test_the_run_record_reads_back_what_was_written(tmp_path):
    from clt import config, plan
    from conftest import ROOT

    cfg = config.load(str(ROOT / "configs" / "demo.py"))  # three phases, replay, upsampling, presets
    pl = plan.resolve(cfg)
    resume.write_record(tmp_path, pl, {"prose": "abc"}, cfg)
    record = resume.read_record(tmp_path)
    assert record.plan == pl and record.digest == pl.digest() and record.data == {"prose": "abc"}
    assert record.config.to_dict() == cfg.to_dict()  # the config it trained with, validated again
    (tmp_path / resume.PLAN_FILE).write_text('{"plan": {}}')
    with pytest.raises(ConfigError, match=r"plan.json = .*: is not a clt plan file \(KeyError"):
        resume.read_record(tmp_path)
