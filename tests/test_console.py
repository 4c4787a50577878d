"""What a run says while it runs: the console tells the story of a smoke run in plain lines."""

import logging
import os
import subprocess
import sys

import pytest
from conftest import SMOKE, smoke_overrides

from clt import config, resume, train


@pytest.fixture(scope="module")
def console(demo_data, tmp_path_factory):
    """The log lines of one smoke run with a (log-only) gap alert, and its workdir."""
    wd = tmp_path_factory.mktemp("console")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("clt")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        cfg = config.load(str(SMOKE), smoke_overrides(demo_data, "monitor.gap_alert=1e-6", "phases.shift.schedule.peak=0.05"))
        train.train(cfg, str(wd), progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return [r.getMessage() for r in records], wd


def _find(lines, text):
    return [line for line in lines if text in line]


def test_the_console_tells_the_story_of_a_run(console):
    lines, wd = console
    assert _find(lines, "compiling the train step") and _find(lines, "train step compiled and run in")
    # each eval with its per-domain losses, at the steps the plan evaluates
    evals = _find(lines, "eval @ step")
    assert [line.split()[3] for line in evals][:4] == ["0", "6", "12", "14"]
    assert all("prose" in line and "code" in line for line in evals)
    # each checkpoint with where it goes; each phase switch and the upsampling switch
    assert _find(lines, f"checkpoint 8 (interval) saving to {wd / 'checkpoints' / '8'}")
    assert _find(lines, "checkpoint 12 (phase end)")
    assert _find(lines, "phase shift starts at step 12") and _find(lines, "phase anneal starts at step 22")
    assert _find(lines, "upsampling starts at step 25 (anneal)")
    # each switch's window closing, forgetting/adaptation at the phase end, and alerts
    assert _find(lines, "stability: prose after the switch at step 12 (shift)")
    assert _find(lines, "phase shift end: prose forgetting") and _find(lines, "phase shift end: code adaptation")
    assert _find(lines, "ALERT stability gap")
    assert _find(lines, "finished: 28 steps")
    # the order a person reads: compile before the first log line, the switch before its baseline eval
    first_log = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert lines.index(_find(lines, "compiling the train step")[0]) < first_log
    assert lines.index(_find(lines, "phase shift starts")[0]) < lines.index(_find(lines, "eval @ step 12")[0])


def test_no_progress_bar_noise_in_a_log_file(demo_data, tmp_path):
    """Not on a terminal (a SLURM log, `| tee`): plain lines, no carriage returns from a progress bar."""
    domains = {"prose": str(demo_data / "prose"), "code": str(demo_data / "code")}
    out = subprocess.run([sys.executable, "-m", "clt.cli", "train", str(SMOKE), "--workdir", str(tmp_path),
                          f"data.domains={domains!r}", "phases.base.steps=4", "phases.shift.steps=3",
                          "phases.anneal.steps=2"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr and "compiling the train step" in out.stderr and "step      1/9" in out.stderr


def test_a_second_trainer_on_a_locked_workdir_is_refused(demo_data, tmp_path):
    cfg = config.load(str(SMOKE), smoke_overrides(demo_data))
    with resume.WorkdirLock(tmp_path):
        with pytest.raises(resume.WorkdirBusy, match=f"in use by pid {os.getpid()}"):
            train.train(cfg, str(tmp_path), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before writing anything
