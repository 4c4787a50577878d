"""`clt launch local`: a job of several processes joined by jax.distributed on this machine trains what one
process trains, its checkpoints resume with another process count, and bad launch input is one line."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMOKE, smoke_overrides

from clt import launch
from clt.metrics import TIMING_FIELDS

TIMING = TIMING_FIELDS  # measured by the clock: the only fields identical runs may disagree on


def _rows(wd):
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def _preempted_step(wd) -> int:
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "preempted"]
    assert len(steps) == 1, steps
    return steps[0]


def assert_same_metrics(expected, got, rel=1e-5):
    """Same rows with the same keys; counts equal, floats within `rel` (the reductions run in another order).
    Clock readings aside: a restart's first row has none when its interval is only the compiled first step."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert a.keys() - TIMING == b.keys() - TIMING, (a["step"], a.keys() ^ b.keys())
        for k in a.keys() - TIMING:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=rel), (a["step"], k)
            else:
                assert b[k] == a[k], (a["step"], k)


def _clt(*args, **env):
    return subprocess.run([sys.executable, "-m", "clt.cli", *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def test_two_processes_train_what_one_process_trains(smoke_run, demo_data, tmp_path):
    """2 processes x 4 CPU devices against the shared smoke run (1 process x 8 devices): the same losses, row
    counts of the whole batch (not process 0's half), evals and checkpoints; one log, process 0's."""
    _, one_wd, _ = smoke_run
    wd = tmp_path / "two"
    result = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                  *smoke_overrides(demo_data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_metrics(_rows(one_wd), _rows(wd))
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == sorted(
        p.name for p in (one_wd / "checkpoints").iterdir())
    children = json.loads((wd / "launch" / "launch.json").read_text())["children"]
    assert [c["env"]["CLT_PROCESS_ID"] for c in children] == ["0", "1"]
    assert all("device_count=4" in c["env"]["XLA_FLAGS"] for c in children)
    assert " INFO " not in (wd / "launch" / "process-1.log").read_text()  # the job's log is process 0's
    assert "finished: 28 steps" in result.stderr


def test_a_two_process_checkpoint_resumes_in_one_process(smoke_run, demo_data, tmp_path):
    _, one_wd, _ = smoke_run
    wd = tmp_path / "run"
    stopped = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                   *smoke_overrides(demo_data, "debug.preempt_at_step=13"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    step = _preempted_step(wd)  # JAX's sync point: the step after the furthest process's, the same for both
    assert step > 13 and f"preempted at step {step}" in stopped.stdout
    assert stopped.stdout.count("preempted at step") == 1  # process 1's line is in its log, not here
    other = (wd / "launch" / "process-1.log").read_text()
    assert f"preempted: saved step {step}" in other and "preempted at step" not in other  # its warning only
    resumed = _clt("train", str(SMOKE), "--workdir", str(wd), "--quiet", *smoke_overrides(demo_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(_rows(one_wd), _rows(wd))


def test_bad_launch_input_is_one_line(tmp_path):
    for args, env, fragment in (
            (["--processes", "3"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
             "the 8 CPU devices of XLA_FLAGS do not split evenly over 3 processes"),
            (["--processes", "0"], {}, "--processes = 0: give a positive number"),
            (["--processes", "2", "batch_size=-1"], {}, "batch_size = -1: must be positive")):
        result = _clt("launch", "local", str(SMOKE), "--workdir", str(tmp_path / "w"), *args, **env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "w").exists()
    broken = _clt("train", str(SMOKE), "--workdir", str(tmp_path / "w"), CLT_COORDINATOR="127.0.0.1:1",
                  CLT_NUM_PROCESSES="two", CLT_PROCESS_ID="0")
    assert broken.returncode == 2 and broken.stderr.strip().splitlines() == [
        "clt: error: CLT_COORDINATOR is set, so CLT_NUM_PROCESSES and CLT_PROCESS_ID must be integers (got 'two', "
        "'0'): set both, or unset CLT_COORDINATOR to train in one process"]


def test_errors_name_the_process_they_come_from(monkeypatch):
    from clt import cli

    assert cli._me() == "clt"
    monkeypatch.setenv("CLT_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("CLT_NUM_PROCESSES", "4")
    monkeypatch.setenv("CLT_PROCESS_ID", "3")
    assert launch.job_from_env() == ("10.0.0.1:1234", 4, 3)
    assert cli._me() == "clt (process 3/4)"


def test_a_damaged_checkpoint_sends_every_process_back_to_the_same_step(smoke_run, demo_data, tmp_path):
    """The newest checkpoint of a 2-process run is damaged: both processes agree to quarantine it and resume
    from the one before, and the run ends as the uninterrupted one did."""
    _, one_wd, _ = smoke_run
    wd = tmp_path / "run"
    stopped = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                   *smoke_overrides(demo_data, "debug.preempt_at_step=13"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    newest = _preempted_step(wd)
    before = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) < newest)
    (wd / "checkpoints" / str(newest) / "meta" / "metadata").write_bytes(b"\x00not json{" * 20)
    resumed = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                   *smoke_overrides(demo_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (wd / "checkpoints" / "quarantine").iterdir()] == [f"{newest}-meta"]
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [before]
    assert_same_metrics(_rows(one_wd), _rows(wd))


def test_time_based_saves_are_decided_once_for_all_processes(demo_data, tmp_path):
    """With several processes the clock of checkpoint.every_minutes is read at log boundaries only and agreed
    (a save is collective): the run ends, and its interval saves sit on log steps."""
    wd = tmp_path / "run"
    result = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                  *smoke_overrides(demo_data, "checkpoint.every=0", "checkpoint.every_minutes=0.0001"))
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    saves = [e["step"] for e in events if e["event"] == "checkpoint" and e["kind"] == "interval"]
    assert saves and all(s % 2 == 0 for s in saves), saves  # configs/smoke.py logs every 2 steps


def test_a_one_process_checkpoint_resumes_in_two_processes(smoke_run, demo_data, tmp_path):
    _, one_wd, _ = smoke_run
    wd = tmp_path / "run"
    stopped = _clt("train", str(SMOKE), "--workdir", str(wd), "--quiet",
                   *smoke_overrides(demo_data, "debug.preempt_at_step=13"))
    assert stopped.returncode == 0 and "preempted at step 13" in stopped.stdout, stopped.stderr[-3000:]
    resumed = _clt("launch", "local", str(SMOKE), "--processes", "2", "--workdir", str(wd), "--quiet",
                   *smoke_overrides(demo_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(_rows(one_wd), _rows(wd))


def _child(workdir, index: int) -> int:
    """The pid of the `clt train` process `index` of the job on `workdir` (from /proc: its argv and env)."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(workdir).encode() in argv and b"train" in argv and f"CLT_PROCESS_ID={index}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no process {index} on {workdir}")


def test_sigterm_to_one_process_stops_the_job_after_one_save(smoke_run, demo_data, tmp_path):
    """A preemption notice reaching only process 1 (as on a cluster where one host is reclaimed): all stop after
    the same step with one checkpoint, and one process resumes the run to the uninterrupted run's metrics."""
    _, one_wd, _ = smoke_run
    wd = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "clt.cli", "launch", "local", str(SMOKE), "--processes", "2",
                            "--workdir", str(wd), "--quiet", *smoke_overrides(demo_data)],
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    metrics = wd / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()) and job.poll() is None:
        time.sleep(0.01)
    os.kill(_child(wd, 1), signal.SIGTERM)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in (wd / "events.jsonl").read_text().splitlines()]
    preempted = [e["step"] for e in events if e["event"] == "preempted"]
    saves = [e["step"] for e in events if e["event"] == "checkpoint" and e["kind"] == "preemption"]
    assert len(preempted) == 1 and saves in ([], preempted) and preempted[0] < 28, (preempted, saves)
    assert f"preempted at step {preempted[0]}" in out
    assert (wd / "checkpoints" / str(preempted[0])).is_dir()  # saved (as a preemption or an interval save)
    resumed = _clt("train", str(SMOKE), "--workdir", str(wd), "--quiet", *smoke_overrides(demo_data))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(_rows(one_wd), _rows(wd))


def test_a_workdir_that_is_not_shared_is_one_line_on_every_process(demo_data, tmp_path):
    """Process 1 sees its own empty tmpfs where process 0's workdir is (a private mount namespace): both stop
    before training with a one-line error, instead of process 1 failing later on files it cannot see."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (a private mount namespace)")
    base, port = tmp_path / "shared", launch._free_port()
    base.mkdir()
    argv = [sys.executable, "-m", "clt.cli", "train", str(SMOKE), "--workdir", str(base / "run"), "--quiet",
            *smoke_overrides(demo_data)]
    env = lambda i: dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",  # noqa: E731
                         XLA_FLAGS="--xla_force_host_platform_device_count=4", CLT_COORDINATOR=f"127.0.0.1:{port}",
                         CLT_NUM_PROCESSES="2", CLT_PROCESS_ID=str(i))
    private = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{base}" && exec "$@"', "sh", *argv]
    procs = [subprocess.Popen(cmd, env=env(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate([argv, private])]
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.startswith("clt")]
        assert p.returncode == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"clt (process {i}/2): error: --workdir = ") and "is not one folder for all 2 " \
            f"processes: {'another' if i == 0 else 'this'} process cannot see what process 0 wrote" in lines[0]
    assert not (base / "run" / "metrics.jsonl").exists()


def test_train_joins_a_job_given_by_flags(monkeypatch):
    """`clt train --coordinator --num-processes --process-id` is the same job as the CLT_* variables, with the
    same checks; the three go together."""
    for var in ("CLT_COORDINATOR", "CLT_NUM_PROCESSES", "CLT_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert launch.job_from_env(launch.job_env(None, None, None)) is None
    env = launch.job_env("10.0.0.2:8476", 4, 1)
    assert launch.job_from_env(env) == ("10.0.0.2:8476", 4, 1)
    assert "CLT_COORDINATOR" not in os.environ  # pure: nothing leaks into this process (or later tests)
    with pytest.raises(launch.LaunchError, match="go together"):
        launch.job_env("10.0.0.2:8476", None, 1)
    with pytest.raises(launch.LaunchError, match="the index is in"):
        launch.job_env("10.0.0.2:8476", 2, 5)
