"""Fault injection: what a weeks-long run on preemptible machines meets, and what it must look like afterwards.

Every case ends the same way: the run is taken to its end with the same command and compared with one
uninterrupted run of the same config (`assert_same_run`: metrics rows and events identical apart from timing
and the run's own history events, nothing duplicated or missing, the same checkpoints kept, the final train
state byte for byte). Kills need a process to die, so they run `clt train` as a subprocess; everything else
runs in-process, sharing the module's reference runs to keep the file at a few minutes on 2 cores.

Cases (the issue's numbering): 1 SIGKILL at seeded random steps, before the first checkpoint, during a save,
twice in a row; 2 damaged array files / Orbax metadata; 3 damaged meta; 4 run files after a kill before the
first checkpoint, a re-run of a finished workdir, a kill at the final save; 5 silent corruption caught by the
fingerprints; 6 two processes on one workdir, a stale lock; 7 a full disk (file-size limit, and a real
tmpfs when this machine lets us mount one); 8 a changed model / optimizer on resume; 9 the spike guard
restarting at switches.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import JAX_CACHE, SMOKE, smoke_overrides
from test_checkpoint import comparable_events, comparable_metrics, final_arrays

from clt import checkpoint, config, plan as plan_lib, replay, resume, train
from clt import step as step_lib
from clt.config import ConfigError
from clt.metrics import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED = 20261123  # picks the kill steps; change it to try other points (the benchmark tries many)
SMOKE_STEPS = 28
SMOKE_SAVES = (8, 12, 16, 22, 24, 28)  # checkpoint.every=8 plus the phase ends 12, 22, 28
EVERY3 = ("checkpoint.every=3", "log.every=1")  # a checkpoint every 3 steps: 15 is there when 18 is damaged
CLT_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


# ----------------------------------------------------------------------------------------------------------
# Helpers: running clt, comparing runs.
# ----------------------------------------------------------------------------------------------------------
def clt_env() -> dict[str, str]:
    """The test process's environment (8 CPU devices) plus this checkout on the path and the shared
    compilation cache, so a subprocess compiles nothing the in-process runs already compiled."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def train_cmd(wd, data, *overrides) -> list[str]:
    return [sys.executable, "-m", "clt.cli", "train", str(SMOKE), "--workdir", str(wd), "--quiet",
            *smoke_overrides(data, *overrides)]


def clt_train(wd, data, *overrides, **kwargs) -> subprocess.CompletedProcess:
    """`clt train configs/smoke.py --workdir WD OVERRIDES` in a subprocess, to its end."""
    return subprocess.run(train_cmd(wd, data, *overrides), cwd=ROOT, env=clt_env(), capture_output=True, text=True,
                          timeout=600, **kwargs)


def killed(wd, data, step: int, in_save: bool = False, *overrides) -> None:
    """A `clt train` that SIGKILLs itself after step `step` (or right after that step's save has started)."""
    p = clt_train(wd, data, f"debug.kill_at_step={step}", f"debug.kill_in_save={in_save}", *overrides)
    assert p.returncode == -signal.SIGKILL, \
        f"expected a SIGKILL at step {step}, got rc {p.returncode}:\n{p.stderr[-3000:]}"


def smoke(data, *overrides) -> config.Config:
    return config.load(str(SMOKE), smoke_overrides(data, *overrides))


def finish(wd, data, *overrides) -> dict:
    """The same command without the debug override, in-process: resumes and runs to the end."""
    result = train.train(smoke(data, *overrides), str(wd), progress=False)
    assert result["final_step"] == SMOKE_STEPS and not result["stopped"], result
    return result


@contextlib.contextmanager
def cli_state_restored():
    """`clt.cli.main` in-process configures the `clt` logger (own handler, no propagation), ignores SIGXFSZ and
    quiets background storage errors: put everything back so later tests (and caplog) see the usual setup."""
    names = ("clt", "absl", "asyncio")
    saved = {n: (list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters), logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in names}
    xfsz, hook = signal.getsignal(signal.SIGXFSZ), sys.unraisablehook
    try:
        yield
    finally:
        for n, (handlers, filters, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.filters[:], lg.propagate = handlers, filters, propagate
            lg.setLevel(level)
        signal.signal(signal.SIGXFSZ, xfsz)
        sys.unraisablehook = hook


def clt_main(argv: list[str]) -> int:
    from clt.cli import main

    with cli_state_restored():
        return main(argv)


def row_key(row: dict) -> tuple:
    kind = "eval" if any(k.startswith("eval/") for k in row) else "train" if "loss" in row else \
        "release" if any(k.startswith("release/") for k in row) else "other"
    return row["step"], kind


def assert_no_duplicates(wd) -> None:
    rows = collections.Counter(row_key(r) for r in read_jsonl(wd / "metrics.jsonl"))
    twice = [k for k, n in rows.items() if n > 1]
    assert not twice, f"metrics rows written twice: {twice}"
    events = collections.Counter(json.dumps(e, sort_keys=True) for e in comparable_events(wd))
    twice = [k for k, n in events.items() if n > 1]
    assert not twice, f"events written twice: {twice}"


def checkpoint_steps(wd) -> list[str]:
    """The entries of checkpoints/ but quarantine/, in step order (a leftover temporary folder shows up too)."""
    names = [p.name for p in (wd / "checkpoints").iterdir() if p.name != checkpoint.QUARANTINE]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def assert_same_run(ref, wd, steps: int = SMOKE_STEPS) -> None:
    """`wd` reads as the uninterrupted run `ref`: the same metrics rows (timing aside) and events (history aside),
    nothing twice, the same checkpoints kept, nothing half-written left, the final state byte for byte."""
    assert_no_duplicates(wd)
    a, b = comparable_metrics(ref), comparable_metrics(wd)
    for x, y in zip(a, b):
        assert x == y, f"first differing metrics row:\n  reference {x}\n  this run  {y}"
    assert len(a) == len(b), f"{len(a)} metrics rows in the reference, {len(b)} here"
    assert comparable_events(ref) == comparable_events(wd)
    assert checkpoint_steps(ref) == checkpoint_steps(wd)
    assert not list(wd.rglob("*.orbax-checkpoint-tmp*")) and not list(wd.rglob("*.tmp"))
    for x, y in zip(final_arrays(ref, steps), final_arrays(wd, steps), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), "final train state differs"


def digest(wd) -> dict[str, str]:
    """sha256 of every file of a workdir but the lock (whose holder changes with each start)."""
    return {str(f.relative_to(wd)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(wd.rglob("*")) if f.is_file() and f.name != resume.LOCK_NAME}


def events_of(wd, kind: str) -> list[dict]:
    return [e for e in read_jsonl(wd / "events.jsonl") if e["event"] == kind]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------------------
# Shared runs.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(smoke_run):
    """The uninterrupted smoke run every killed run is compared with (the session's: read, never written)."""
    wd = smoke_run[1]
    assert_no_duplicates(wd)  # the comparison's own premise
    return wd


@pytest.fixture(scope="module")
def reference3(demo_data, tmp_path_factory):
    """The uninterrupted smoke run with a checkpoint every 3 steps and a log row every step."""
    wd = tmp_path_factory.mktemp("reference3")
    finish(wd, demo_data, *EVERY3)
    return wd


@pytest.fixture(scope="module")
def stopped_at_18(demo_data, tmp_path_factory):
    """The every-3 run stopped cleanly after step 18: checkpoints 12 (phase end), 15 and 18. Tests copy it."""
    wd = tmp_path_factory.mktemp("stopped18")
    train.train(smoke(demo_data, *EVERY3, "debug.preempt_at_step=18"), str(wd), progress=False)
    assert checkpoint_steps(wd) == ["12", "15", "18"]
    return wd


# ----------------------------------------------------------------------------------------------------------
# 1 (and 4a). SIGKILL at seeded random points, then resume to the end.
# ----------------------------------------------------------------------------------------------------------
def kill_trials(seed: int) -> dict[str, list[tuple[int, bool]]]:
    """(kill_at_step, kill_in_save) per kill of each trial, drawn from `seed`. kill_at_step=k dies after update k
    and its log row, before k's checkpoint; with kill_in_save it dies right after k's save has started."""
    rng = random.Random(seed)
    before_first = rng.randint(1, SMOKE_SAVES[0])
    in_save = rng.choice(SMOKE_SAVES)
    k1 = rng.randint(1, SMOKE_STEPS - 1)
    resumed_at = max((s for s in SMOKE_SAVES if s < k1), default=0)  # the second run restarts here
    k2 = rng.randint(resumed_at + 1, SMOKE_STEPS)
    return {"before_first_checkpoint": [(before_first, False)], "during_save": [(in_save, True)],
            "two_kills": [(k1, False), (k2, k2 in SMOKE_SAVES and rng.random() < 0.5)]}


TRIALS = kill_trials(SEED)


def trial_id(name: str) -> str:
    return name + "-" + "-".join(f"kill{s}{'-in-save' if v else ''}" for s, v in TRIALS[name])


@pytest.mark.parametrize("trial", list(TRIALS), ids=trial_id)
def test_sigkill_then_resume_is_the_uninterrupted_run(demo_data, reference, tmp_path, trial):
    for step, in_save in TRIALS[trial]:
        killed(tmp_path, demo_data, step, in_save)
        assert not events_of(tmp_path, "finished")
    if trial == "before_first_checkpoint":  # 4a: what the restart from step 0 must not write twice is there
        assert not (tmp_path / "checkpoints").exists() or not checkpoint_steps(tmp_path)
        assert row_key(read_jsonl(tmp_path / "metrics.jsonl")[0]) == (0, "eval")
        assert [e["step"] for e in events_of(tmp_path, "phase_start")] == [0]
    finish(tmp_path, demo_data)
    assert_same_run(reference, tmp_path)
    assert [row_key(r) for r in read_jsonl(tmp_path / "metrics.jsonl")].count((0, "eval")) == 1
    assert [e["step"] for e in events_of(tmp_path, "phase_start")] == [0, 12, 22]
    assert len(events_of(tmp_path, "finished")) == 1


# ----------------------------------------------------------------------------------------------------------
# 2, 3, 5. Damaged checkpoints are quarantined, the previous one is used, and the run ends as if nothing happened.
# ----------------------------------------------------------------------------------------------------------
def biggest_state_file(ckpt: pathlib.Path) -> pathlib.Path:
    """The largest array data file of a checkpoint (Orbax's OCDBT data files live in state/**/d/)."""
    files = [f for f in (ckpt / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


def overwrite_middle(f: pathlib.Path, n: int = 64) -> None:
    """Invert n bytes in the middle of a file. Orbax's chunks are zstd-compressed, so what that does to the
    values depends on where it lands: a decoding error, NaNs, or other finite values."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    f.write_bytes(bytes(data))


def truncate_half(f: pathlib.Path) -> None:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


DAMAGE = {  # name: (what is done to checkpoint 18, the quarantine reasons that describe it)
    "truncated_array_file": (lambda c: truncate_half(biggest_state_file(c)), {"unreadable"}),
    "deleted_array_file": (lambda c: biggest_state_file(c).unlink(), {"unreadable"}),
    "garbage_state_metadata": (lambda c: (c / "state" / "_METADATA").write_bytes(b"\x00not json{" * 20), {"metadata"}),
    "garbage_meta": (lambda c: (c / "meta" / "metadata").write_bytes(b"\x00not json{" * 20), {"meta"}),
    "overwritten_bytes": (lambda c: overwrite_middle(biggest_state_file(c)), {"checksum", "unreadable", "nonfinite"}),
}


THROUGH_CLI = {"truncated_array_file", "garbage_meta"}  # resumed by `clt train`: its stderr is checked too


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_quarantined_and_the_run_ends_identical(demo_data, reference3, stopped_at_18,
                                                                             tmp_path, damage, caplog):
    wd = tmp_path / "run"
    shutil.copytree(stopped_at_18, wd)
    harm, reasons = DAMAGE[damage]
    harm(wd / "checkpoints" / "18")
    if damage in THROUGH_CLI:  # a warning, not a traceback (Orbax's aborted reads leave asyncio copies behind)
        p = clt_train(wd, demo_data, *EVERY3)
        assert p.returncode == 0, p.stderr[-4000:]
        assert "Traceback" not in p.stderr and not not_log_lines(p.stderr), not_log_lines(p.stderr)[:20]
        log_text = p.stderr
    else:
        finish(wd, demo_data, *EVERY3)
        log_text = caplog.text
    assert (wd / "checkpoints" / checkpoint.QUARANTINE).is_dir(), "nothing was quarantined"
    quarantined = [p.name for p in (wd / "checkpoints" / checkpoint.QUARANTINE).iterdir()]
    assert len(quarantined) == 1 and quarantined[0].split("-", 1)[0] == "18", quarantined
    assert quarantined[0].split("-", 1)[1] in reasons, quarantined
    assert "checkpoint 18 is damaged" in log_text and "trying the previous one" in log_text
    assert [e["step"] for e in events_of(wd, "resume")] == [15]
    assert [e["checkpoint"] for e in events_of(wd, "quarantine")] == quarantined
    assert_same_run(reference3, wd)


def raw_state(checkpoints: pathlib.Path, step: int) -> list[np.ndarray]:
    """What Orbax itself restores (no target, no clt checks)."""
    store = checkpoint.CheckpointStore(checkpoints, config.CheckpointConfig(), read_only=True)
    try:
        state = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return [np.asarray(x) for x in jax.tree.leaves(state)]
    finally:
        store.close()


def silent_bit_flip(ckpt: pathlib.Path, good: list[np.ndarray], scratch: pathlib.Path) -> int:
    """Flip one bit of the checkpoint's largest data file where Orbax still reads it, every value stays finite and
    some value changes: damage that only a content fingerprint can see. Chunks are zstd-compressed, so where a bit
    lands decides between a decoding error, NaNs and a silent change: offsets are probed from the middle outwards
    on copies (fresh paths, so no reader cache can answer), and the first silent one is applied. Returns it."""
    f = biggest_state_file(ckpt)
    original, rel = f.read_bytes(), f.relative_to(ckpt)
    for k in range(60):
        pos = len(original) // 2 + (k + 1) // 2 * 1031 * (-1) ** k
        data = bytearray(original)
        data[pos] ^= 0x01
        probe = scratch / f"probe{k}" / ckpt.name
        shutil.copytree(ckpt, probe)
        (probe / rel).write_bytes(bytes(data))
        try:
            bad = raw_state(probe.parent, int(ckpt.name))
        except Exception:  # noqa: BLE001 - a decoding error: not silent
            continue
        finite = all(np.isfinite(x).all() for x in bad if np.issubdtype(x.dtype, np.floating))
        if finite and any(x.tobytes() != y.tobytes() for x, y in zip(good, bad, strict=True)):
            f.write_bytes(bytes(data))
            return pos
    pytest.fail(f"no offset of {f} gives a silent change")


def test_silent_corruption_is_caught_by_the_fingerprints(demo_data, reference3, stopped_at_18, tmp_path, caplog):
    wd = tmp_path / "run"
    shutil.copytree(stopped_at_18, wd)
    silent_bit_flip(wd / "checkpoints" / "18", raw_state(stopped_at_18 / "checkpoints", 18), tmp_path / "scratch")
    finish(wd, demo_data, *EVERY3)
    assert (wd / "checkpoints" / checkpoint.QUARANTINE).is_dir(), "the corrupted checkpoint was restored"
    assert [p.name for p in (wd / "checkpoints" / checkpoint.QUARANTINE).iterdir()] == ["18-checksum"]
    assert "checkpoint 18 is damaged" in caplog.text and "content differs from what was saved" in caplog.text
    assert [e["step"] for e in events_of(wd, "resume")] == [15]
    assert_same_run(reference3, wd)


# ----------------------------------------------------------------------------------------------------------
# 4. Run files of a finished run, and after a kill at the very end.
# ----------------------------------------------------------------------------------------------------------
def test_rerun_of_a_finished_workdir_changes_nothing(demo_data, reference, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = digest(wd)
    assert clt_main(["train", str(SMOKE), "--workdir", str(wd), "--quiet",
                     *smoke_overrides(demo_data)]) == 0
    assert f"already finished at step {SMOKE_STEPS}" in capsys.readouterr().out
    after = digest(wd)
    assert after == before
    assert any(k.startswith("checkpoints/") for k in after) and {"metrics.jsonl", "events.jsonl"} <= after.keys()


def test_kill_right_after_the_final_save_then_rerun(demo_data, reference, tmp_path):
    killed(tmp_path, demo_data, SMOKE_STEPS, True)  # the final checkpoint's save has started, nothing after it
    assert events_of(tmp_path, "checkpoint")[-1]["step"] == SMOKE_STEPS and not events_of(tmp_path, "finished")
    finish(tmp_path, demo_data)
    assert_same_run(reference, tmp_path)
    assert len(events_of(tmp_path, "finished")) == 1


def test_kill_after_the_final_save_completed_then_rerun(demo_data, reference, tmp_path):
    """Killed after the final checkpoint is complete but before `finished` is written: the re-run only adds it."""
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    lines = (wd / "events.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["event"] == "finished"
    (wd / "events.jsonl").write_text("".join(lines[:-1]))
    ckpts = {k: v for k, v in digest(wd).items() if k.startswith("checkpoints/")}
    result = train.train(smoke(demo_data), str(wd), progress=False)
    assert result.get("already_finished")
    assert_same_run(reference, wd)
    assert len(events_of(wd, "finished")) == 1
    assert {k: v for k, v in digest(wd).items() if k.startswith("checkpoints/")} == ckpts


# ----------------------------------------------------------------------------------------------------------
# 6. One process per workdir.
# ----------------------------------------------------------------------------------------------------------
def test_a_second_process_on_a_running_workdir_is_refused(demo_data, reference, tmp_path):
    wd = tmp_path / "run"
    out, err = open(tmp_path / "first.out", "w"), open(tmp_path / "first.err", "w")
    first = subprocess.Popen(train_cmd(wd, demo_data), cwd=ROOT, env=clt_env(), stdout=out, stderr=err)
    stopped = False
    try:
        deadline = time.monotonic() + 300
        while (resume.lock_holder(wd) or {}).get("pid") != first.pid:
            assert first.poll() is None, f"the first run ended (rc {first.returncode}) before it held the lock"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # keep it holding the lock however fast or slow the second one starts
        stopped = True
        second = clt_train(wd, demo_data)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clt: error:") and f"pid {first.pid}" in lines[0], lines
    finally:
        if stopped:
            os.kill(first.pid, signal.SIGCONT)
        try:
            first.wait(timeout=600)
        except subprocess.TimeoutExpired:
            first.kill()
            raise
        finally:
            out.close(), err.close()
    assert first.returncode == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert_same_run(reference, wd)
    assert resume.lock_holder(wd) is None


def test_a_stale_lock_is_taken_over_with_a_warning(demo_data, reference, tmp_path, caplog):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    pid = dead_pid()
    stale = dict(pid=pid, host=socket.gethostname(), since="2026-01-01 00:00:00")  # no process holds its flock
    (wd / resume.LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="clt"):
        result = train.train(smoke(demo_data), str(wd), progress=False)
    assert result["final_step"] == SMOKE_STEPS
    took = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
    assert len(took) == 1 and f"pid {pid}" in took[0], caplog.text
    assert resume.lock_holder(wd) is None  # released at the end
    assert (wd / resume.LOCK_NAME).read_text() == ""  # and released clean: no pid left for a next "takeover"


# ----------------------------------------------------------------------------------------------------------
# 7. A full disk.
# ----------------------------------------------------------------------------------------------------------
def not_log_lines(stderr: str) -> list[str]:
    """What `clt train` printed on stderr beyond its own log lines and `clt: error:` lines."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("clt: error:")
            and not CLT_LOG_LINE.match(ln)]


def assert_one_line_storage_error(p: subprocess.CompletedProcess, what: str) -> None:
    """Exit 1; on stderr the run's own log lines and exactly one `clt: error:` line naming the problem: no
    traceback, and none of the background threads' copies of the same failure."""
    assert p.returncode == 1, f"rc {p.returncode}:\n{p.stderr[-4000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("clt: error:")]
    assert len(errors) == 1 and what in errors[0], errors
    assert not not_log_lines(p.stderr), not_log_lines(p.stderr)[:10]


def test_clt_train_drops_only_the_copies_of_orbax_failures():
    """What `clt train` filters (deterministically here; the subprocess tests meet these copies only by chance):
    a refused write's copies on absl and asyncio, asyncio's leftovers of any failed Orbax read or write, and the
    unraisables of abandoned Orbax coroutines; never other errors."""
    from clt import cli

    def raised(exc: BaseException, filename: str) -> BaseException:
        try:
            exec(compile("raise exc", filename, "exec"), {"exc": exc})
        except BaseException as e:  # noqa: BLE001
            return e

    orbax_read = raised(ValueError("FAILED_PRECONDITION: Error reading ..."), "/site-packages/orbax/checkpoint/x.py")
    disk_full = raised(OSError(28, "No space left on device"), "/elsewhere/y.py")
    other = raised(ValueError("a real bug"), "/elsewhere/y.py")

    def shown(logger: str, exc: BaseException) -> bool:
        record = logging.LogRecord(logger, logging.ERROR, __file__, 1, "msg", None, (type(exc), exc, exc.__traceback__))
        return logging.getLogger(logger).filter(record)

    class Unraisable:
        def __init__(self, exc):
            self.exc_type, self.exc_value, self.exc_traceback, self.object = type(exc), exc, exc.__traceback__, None

    passed = []
    with cli_state_restored():
        sys.unraisablehook = passed.append
        cli._quiet_orbax_leftovers()
        assert not shown("absl", disk_full) and not shown("asyncio", disk_full)
        assert not shown("asyncio", orbax_read) and shown("absl", orbax_read)  # Orbax's own error records stay
        assert shown("asyncio", other) and shown("absl", other)
        for exc in (orbax_read, RuntimeError("Event loop is closed"), other):
            sys.unraisablehook(Unraisable(exc))
        assert [u.exc_value for u in passed] == [other]
    # the warning Python gives for an abandoned serialization coroutine, and only that one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet_orbax_leftovers()
        for message in ("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited",
                        "coroutine 'my_own_task' was never awaited"):
            warnings.warn_explicit(message, RuntimeWarning, "sys", 1)
    assert [str(w.message) for w in caught] == ["coroutine 'my_own_task' was never awaited"]


def assert_nothing_partial(wd) -> None:
    assert not list(wd.rglob("*.orbax-checkpoint-tmp*")), list(wd.rglob("*.orbax-checkpoint-tmp*"))
    assert not list(wd.rglob("*.tmp")), list(wd.rglob("*.tmp"))


def test_file_size_limit_during_a_save_is_one_line_and_the_rerun_resumes(demo_data, reference, tmp_path):
    train.train(smoke(demo_data, "debug.preempt_at_step=9"), str(tmp_path), progress=False)  # checkpoints 8, 9
    limit = 64 * 1024  # run files and Orbax's metadata fit; a checkpoint's array data file (100-400 KB) does not
    # The limit is set in the child before clt starts (what `ulimit -f 64` does in a shell); a preexec_fn would
    # run Python between fork and exec of this multithreaded (JAX) process, which JAX warns may deadlock.
    with_limit = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
                  "sys.argv[0] = 'clt'; runpy.run_module('clt.cli', run_name='__main__')").format(limit)
    cmd = [sys.executable, "-c", with_limit, *train_cmd(tmp_path, demo_data)[3:]]
    p = subprocess.run(cmd, cwd=ROOT, env=clt_env(), capture_output=True, text=True, timeout=600)
    assert_one_line_storage_error(p, "file size limit")
    assert checkpoint_steps(tmp_path) == ["8", "9"]  # the save at 12 failed and left nothing
    assert_nothing_partial(tmp_path)
    finish(tmp_path, demo_data)
    assert [e["step"] for e in events_of(tmp_path, "resume")] == [9, 9]
    assert_same_run(reference, tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3.5 MB tmpfs (one smoke checkpoint is ~2.2 MB); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3584k", "tmpfs", str(mnt)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_full_disk_is_one_line_and_the_rerun_resumes(demo_data, reference, small_tmpfs):
    wd = small_tmpfs / "run"
    p = clt_train(wd, demo_data)  # checkpoint 8 fits, 12 does not
    assert_one_line_storage_error(p, "disk full")
    assert checkpoint_steps(wd) == ["8"]
    assert_nothing_partial(wd)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True, capture_output=True, timeout=30)
    finish(wd, demo_data)
    assert [e["step"] for e in events_of(wd, "resume")] == [8]
    assert_same_run(reference, wd)


# ----------------------------------------------------------------------------------------------------------
# 8. Changed config on resume.
# ----------------------------------------------------------------------------------------------------------
def test_a_changed_model_on_resume_is_a_config_error_and_moves_nothing(demo_data, stopped_at_18, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(stopped_at_18, wd)
    before = digest(wd)
    code = clt_main(["train", str(SMOKE), "--workdir", str(wd), "--quiet",
                     *smoke_overrides(demo_data, *EVERY3, "model.preset=demo")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clt: error:")]
    assert code == 2
    assert len(err) == 1 and "model.preset" in err[0], err
    assert not (wd / "checkpoints" / checkpoint.QUARANTINE).exists()
    assert digest(wd) == before


def test_a_changed_optimizer_setting_on_resume_is_recorded(demo_data, stopped_at_18, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(stopped_at_18, wd)
    result = train.train(smoke(demo_data, *EVERY3, "optim.weight_decay=0.05", "debug.preempt_at_step=19"), str(wd),
                         progress=False)
    assert result["final_step"] == 19
    changes = events_of(wd, "config_change")
    assert len(changes) == 1 and changes[0]["step"] == 18
    assert changes[0]["changes"] == {"optim.weight_decay": [0.1, 0.05]}
    assert not (wd / "checkpoints" / checkpoint.QUARANTINE).exists()


# ----------------------------------------------------------------------------------------------------------
# 9. The spike guard restarts at every switch.
# ----------------------------------------------------------------------------------------------------------
def guard(losses: list[float], switches: set[int], factor: float, restart: bool) -> tuple[list[bool], list[float]]:
    """train_step's spike guard replayed on the logged losses: (update applied?, running mean after the step)
    per step. `restart`: the statistics restart at every switch (what clt does); False: carried across."""
    f32 = np.float32
    mean, count, applied, means = f32(0), 0, [], []
    for step, loss in enumerate(losses):
        if restart and step in switches:
            mean, count = f32(0), 0
        ok = math.isfinite(loss) and not (count >= step_lib.SPIKE_WARMUP and f32(loss) > f32(factor) * mean)
        if ok:
            mean = f32(loss) if count == 0 else f32(step_lib.EMA_DECAY) * mean + f32(1 - step_lib.EMA_DECAY) * f32(loss)
            count += 1
        applied.append(ok)
        means.append(float(mean))
    return applied, means


def test_spike_guard_restarts_at_a_switch_to_a_harder_domain(demo_data, tmp_path):
    """Character names (easy) for 30 steps, then code (much harder): the loss right after the switch is far above
    the old running mean, so a guard that carried its mean across would skip there; clt's restarts."""
    raw = config.load_raw(str(SMOKE))
    raw["data"]["domains"] = {d: str(demo_data / d) for d in ("prose", "code", "unicode")}
    raw["phases"] = (dict(name="names", steps=30, mixture={"unicode": 1.0},
                          schedule=dict(kind="constant", warmup=2, peak=3e-3)),
                     dict(name="code", steps=22, mixture={"code": 1.0},  # > SPIKE_WARMUP: the guard re-arms
                          schedule=dict(kind="constant", warmup=2, peak=1e-3)))
    raw["optim"] = dict(spike_factor=1.05, max_skips=1000)  # tight; never stop, so every decision is logged
    raw["log"], raw["checkpoint"] = dict(every=1), dict(every=0, keep=1)
    raw["monitor"] = dict(every=100, dense_every=100, dense_window=0)
    cfg = config.from_dict(raw)
    train.train(cfg, str(tmp_path), progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(52))
    losses = [r["loss"] for r in rows]
    switches = {s["step"] for s in plan_lib.resolve(cfg).switches()}
    assert switches == {30}

    carried, _ = guard(losses, switches, 1.05, restart=False)
    assert not carried[30], "the construction must make a carried-over mean call the switch a spike"
    applied, means = guard(losses, switches, 1.05, restart=True)
    skipped_total = list(np.cumsum([not a for a in applied]))
    assert [r.get("skipped_total", 0) for r in rows] == skipped_total
    assert all(applied[30:30 + step_lib.SPIKE_WARMUP]), "no skip right after the switch"
    np.testing.assert_allclose([r["loss_ema"] for r in rows], means, rtol=1e-6)
    assert rows[30]["loss_ema"] == rows[30]["loss"]  # the mean restarts from the switch step's own loss


# ----------------------------------------------------------------------------------------------------------
# 10. Start-up checks: divisibility on this machine, a data set too small for seq_len, stale replay snapshots.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [("batch_size=12", "batch_size"), ("data.eval_batch=4", "data.eval_batch"),
                                             ("optim.grad_accum=2", "optim.grad_accum"), ("mesh.tensor=3", "mesh.tensor"),
                                             ("data.seq_len=100000", "data.seq_len")])
def test_start_up_checks_fail_before_anything_is_written(demo_data, tmp_path, override, field):
    """Divisibility on this machine's 8 devices (and a seq_len the data cannot fill) is a ConfigError naming the
    field, raised before the mesh, the model or any run file exists."""
    cfg = config.load(str(SMOKE), smoke_overrides(demo_data, override))
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)} = "):
        train.train(cfg, str(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_stale_snapshot_is_rebuilt_not_reused(demo_data, tmp_path, caplog):
    """A snapshot left by a run with another seed (same step, same folder) must not be replayed: the buffer
    rebuilds it to what this plan's reservoir holds. Reusing it would replay rows this run never trained."""
    from clt.data.shards import DomainData

    data = {d: DomainData(demo_data / d) for d in ("prose", "code")}
    plans = {seed: plan_lib.resolve(config.load(str(SMOKE), smoke_overrides(demo_data, f"seed={seed}")))
             for seed in (0, 1)}
    old = replay.ReplayBuffer(tmp_path, plans[1], 16, data).snapshot(12)
    fresh = replay.ReplayBuffer(tmp_path / "fresh", plans[0], 16, data).snapshot(12)
    assert not np.array_equal(old.draw, fresh.draw)  # the seeds really give different reservoirs
    again = replay.ReplayBuffer(tmp_path, plans[0], 16, data).snapshot(12)
    assert "does not match this plan" in caplog.text
    assert np.array_equal(again.draw, fresh.draw) and np.array_equal(np.asarray(again.tokens), np.asarray(fresh.tokens))
    caplog.clear()
    replay.ReplayBuffer(tmp_path, plans[0], 16, data).snapshot(12)  # now current: reused without a word
    assert "does not match" not in caplog.text
