"""What a restart of `clt train` on an existing workdir may do: the workdir lock, and run-file rewriting.

A continual pre-training run lives for weeks on preemptible machines, so every start of `clt train` is
potentially a restart. Two rules make that safe:
- one job owns a workdir at a time: an exclusive `flock` on `<workdir>/.lock`, held for the life of the
  process and released by the kernel when the process dies (so a lock is never stale in the kernel's view;
  the pid and host written into the file only say who held it last);
- the run files (`metrics.jsonl`, `events.jsonl`) are keyed by step: a start at step s (restored from a
  checkpoint, or 0 without one) rewrites exactly the rows that it will produce again, so after any kill
  the files read as one uninterrupted run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import time

log = logging.getLogger("clt")

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on a workdir, held by this process until `release()` or exit.

    `flock` locks belong to the open file description: the kernel drops them when the process dies, even on
    SIGKILL, so a crashed run never blocks the next one. What the file says (pid, host, start time) is only
    information: when it names another process, that process has died without releasing, and the takeover
    is logged with its pid and host."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = read_holder(self.path)
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
            raise WorkdirBusy(f"workdir {self.path.parent} is in use by {who} (lock {self.path}); wait for that "
                              f"run to end, stop it, or use another --workdir") from None
        previous = _parse(os.read(fd, 4096))
        if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
            log.warning("took over the lock of %s left by pid %s on %s (started %s), which is no longer running",
                        self.path.parent, previous.get("pid"), previous.get("host"), previous.get("since", "?"))
        mine = dict(pid=os.getpid(), host=socket.gethostname(),
                    since=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(mine).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock after clearing the file: only a process that died holding the lock leaves its pid behind."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(raw: bytes) -> dict:
    try:
        out = json.loads(raw.decode() or "{}")
        return out if isinstance(out, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def read_holder(path: str | pathlib.Path) -> dict:
    """What a lock file says: {pid, host, since} of its last holder, or {} when absent or unreadable."""
    try:
        return _parse(pathlib.Path(path).read_bytes())
    except OSError:
        return {}


def lock_holder(workdir: str | pathlib.Path) -> dict | None:
    """The live holder of a workdir's lock ({pid, host, since}), or None when no process holds it.

    Probes with a shared non-blocking flock on a separate descriptor, released at once: it never blocks or
    disturbs a running run (a holder's exclusive lock makes the probe fail, which is the answer)."""
    path = pathlib.Path(workdir) / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path) or {"pid": "?", "host": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# Run files: keyed by step, rewritten from the step a (re)start begins at.
# ----------------------------------------------------------------------------------------------------------
# Events that record the run's own history rather than its content: a restart never produces them again.
HISTORY_EVENTS = ("resume", "preempted", "stopped", "quarantine", "config_change")


def kept_on_restart(start: int, row: dict) -> bool:
    """Whether a row at or after `start` survives a restart at `start`: history events, and what was written
    at `start` itself before its checkpoint was saved (the checkpoint event, a branch's release rows), which
    the restarted run does not redo. Everything else at or after `start` is produced again."""
    if row.get("event") in HISTORY_EVENTS:
        return True
    return start > 0 and row.get("step") == start and (
        row.get("event") in ("checkpoint", "release") or any(k.startswith("release/") for k in row))


def rewrite_run_files(workdir: str | pathlib.Path, start: int) -> None:
    """Drop the rows of `metrics.jsonl` and `events.jsonl` that a run starting at `start` writes again (and
    any line torn by a kill), so that after any number of restarts the files read as one uninterrupted run."""
    from clt.metrics import truncate_from

    wd = pathlib.Path(workdir)
    for name in ("metrics.jsonl", "events.jsonl"):
        truncate_from(wd / name, start, keep=lambda row: kept_on_restart(start, row))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("domains",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Plan-defining fields are checked by the resume-plan rules (checkpoint.check_resume_plan), the model's shape
# by the checkpoint's layout, and debug switches are per invocation: none of them is a "setting change".
_NOT_SETTINGS = ("phases", "budget", "debug", "model.init_from")


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{dotted field: [old, new]} between the config a checkpoint was saved with and this run's, for the
    fields a resume may change freely (optim.*, checkpoint.*, monitor.*, log.*, mesh.*, eval settings, ...)."""
    a, b = _flatten(old), _flatten(new)
    changed = {}
    for k in sorted(a.keys() | b.keys()):
        if any(k == p or k.startswith(p + ".") for p in _NOT_SETTINGS):
            continue
        if a.get(k) != b.get(k):
            changed[k] = [a.get(k), b.get(k)]
    return changed
