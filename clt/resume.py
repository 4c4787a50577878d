"""What a restart of `clt train` on an existing workdir accepts, refuses and records; the lock; the run files.

A continual pre-training run lives for weeks on preemptible machines, so every start of `clt train` is
potentially a restart. Two rules make that safe:
- one job owns a workdir at a time: an exclusive `flock` on `<workdir>/.lock`, held for the life of the
  process and released by the kernel when the process dies (so a lock is never stale in the kernel's view;
  the pid and host written into the file only say who held it last);
- the run files (`metrics.jsonl`, `events.jsonl`) are keyed by step: a start at step s (restored from a
  checkpoint, or 0 without one) rewrites exactly the rows that it will produce again, so after any kill
  the files read as one uninterrupted run.
A checkpoint is resumed only when the config still describes its past: the same model shape, the same
init_from, and a plan whose phases that already ran are unchanged (future phases may be edited or added).
Nothing here imports jax: `clt status` reads the lock without starting it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from clt.config import Config, ConfigError, from_dict
from clt.metrics import iter_jsonl, write_atomic
from clt.plan import PhasePlan, Plan, resolve
from clt.schedule import length_fields

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
    wd = pathlib.Path(workdir)
    for name in ("metrics.jsonl", "events.jsonl"):
        truncate_from(wd / name, start, keep=lambda row: kept_on_restart(start, row))


def truncate_from(path: str | pathlib.Path, step: int, keep: Callable[[dict], bool] | None = None) -> None:
    """Drop rows with step >= `step` unless `keep(row)`; the file is replaced whole (see `write_atomic`)."""
    p = pathlib.Path(path)
    if not p.exists():
        return
    rows = [r for r in iter_jsonl(p) if r.get("step", -1) < step or (keep is not None and keep(r))]
    write_atomic(p, "".join(json.dumps(r) + "\n" for r in rows))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("domains",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Plan-defining fields are checked by the resume-plan rules (check_resume_plan), the model's shape
# by the checkpoint's layout, and debug switches are per invocation: none of them is a "setting change".
_NOT_SETTINGS = ("phases", "budget", "debug", "model.init_from")


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{dotted field: [old, new]} between the config a checkpoint was saved with and this run's, for the
    fields a resume may change freely (optim.*, checkpoint.*, monitor.*, log.*, mesh.*, eval settings, ...)."""
    a, b = _flatten(old), _flatten(new)
    defaults = _flatten(Config().to_dict())
    changed = {}
    for k in sorted(a.keys() | b.keys()):
        if any(k == p or k.startswith(p + ".") for p in _NOT_SETTINGS):
            continue
        if k not in a and k in defaults and b.get(k) == defaults[k]:
            continue  # a field clt gained since the checkpoint, left at its default: nothing changed
        if a.get(k) != b.get(k):
            changed[k] = [a.get(k), b.get(k)]
    return changed



# ----------------------------------------------------------------------------------------------------------
# plan.json: what the run is, written at every start, read by the report, `clt status` and `clt replay`.
# ----------------------------------------------------------------------------------------------------------
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class RunRecord:
    """A workdir's plan.json: the plan that ran (the authority on resume, not today's config), its digest, the
    data manifests, and the config it was trained with."""

    plan: Plan
    digest: str
    data: dict[str, str]
    """Domain -> content hash of its prepared data (`data_manifest`)."""
    config: Config


def write_record(workdir: str | pathlib.Path, plan: Plan, data: dict[str, str], cfg: Config) -> None:
    record = dict(plan=plan.to_json(), digest=plan.digest(), data=data, config=cfg.to_dict())
    write_atomic(pathlib.Path(workdir) / PLAN_FILE, json.dumps(record, indent=1))


def read_record(workdir: str | pathlib.Path) -> RunRecord:
    """The run record of `workdir` (whose plan.json must exist); a file clt cannot read is a ConfigError."""
    path = pathlib.Path(workdir) / PLAN_FILE
    try:
        saved = json.loads(path.read_text())
        plan = Plan.from_json(saved["plan"])
        cfg = from_dict(saved["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise ConfigError("plan.json", str(path), f"is not a clt plan file ({type(e).__name__}: {e})",
                          "re-run `clt train` on this workdir to rewrite it") from e
    return RunRecord(plan=plan, digest=saved.get("digest") or plan.digest(), data=saved.get("data", {}), config=cfg)


# ----------------------------------------------------------------------------------------------------------
# What a checkpoint must agree with: its plan's past, the model's shape, init_from.
# ----------------------------------------------------------------------------------------------------------
# Fields that follow from a phase's duration: a `percent` phase may see them change with the budget, and the
# pinned past wins (the plan that ran is the authority); any other change to a phase that ran is an error.
_RANGE_FIELDS = {"start", "end", "row_start", "upsample_start", "replay_weights"}
_RANGE_SCHEDULE_FIELDS = length_fields() | {"chain_start"}


def phase_changes(old: PhasePlan, new: PhasePlan, percent: bool) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every change that matters to a phase that ran."""
    skip = _RANGE_FIELDS if percent else set()
    old_d, new_d = dataclasses.asdict(old), dataclasses.asdict(new)
    changed = [(k, old_d[k], new_d[k]) for k in old_d if k not in skip | {"schedule"} and old_d[k] != new_d[k]]
    s_old, s_new = old.schedule.defining(), new.schedule.defining()
    skip_s = _RANGE_SCHEDULE_FIELDS if percent else set()
    changed += [(f"schedule.{k}", s_old.get(k), s_new.get(k)) for k in sorted(s_old.keys() | s_new.keys())
                if k not in skip_s and s_old.get(k) != s_new.get(k)]
    return changed


def check_resume_plan(cfg: Config, fresh: Plan, meta: dict, step: int, manifest: dict[str, str],
                      accept_changed_past: bool = False) -> Plan:
    """The plan to continue with at `step`: phases that started keep what they ran; later ones come from cfg
    (`fresh` is cfg resolved from scratch).

    Editing future phases, appending phases or pointing a future phase at new data is fine. A change to a
    phase that has already started, or to the data it trained on, is an error naming the field, unless
    `accept_changed_past` (the CLI's --accept-changed-past) says the user means it."""
    if accept_changed_past:
        return fresh
    ran = Plan.from_json(meta["plan"]).with_domains(cfg.domain_names())
    # These fix which example every past row was: changing them would rewrite the past.
    for field, old, new in (("seed", ran.seed, cfg.seed), ("data.seq_len", ran.seq_len, cfg.data.seq_len),
                            ("data.block_rows", ran.block_rows, cfg.data.block_rows)):
        if old != new:
            raise ConfigError(field, new, f"the run so far used {old}", "restore it, or pass --accept-changed-past")
    started = [p for p in ran.phases if p.start < step]
    if len(cfg.phases) < len(started):
        raise ConfigError("phases", [ph.name for ph in cfg.phases], f"phases that already ran were removed "
                          f"(ran: {[p.name for p in started]})", "keep them, or pass --accept-changed-past")
    for old, new, ph in zip(started, fresh.phases, cfg.phases):
        changed = phase_changes(old, new, percent=ph.percent is not None)
        if changed:
            key, before, after = changed[0]
            raise ConfigError(f"phases.{old.name}.{key}", after, f"phase {old.name!r} already ran (from step "
                              f"{old.start}) with {key}={before!r}",
                              "restore its old value, or pass --accept-changed-past to change the past knowingly")
    for old in started:
        for d in (d for d, w in zip(ran.domains, old.mixture) if w > 0):
            before = meta.get("data", {}).get(d)
            if before is not None and d in manifest and manifest[d] != before:  # gone data is fine: it ran
                raise ConfigError(f"data.domains.{d}", dict(cfg.data.domains).get(d),
                                  f"the data of domain {d!r} changed since phase {old.name!r} trained on it",
                                  "point a new domain name at the new data for future phases, or pass "
                                  "--accept-changed-past")
    if list(fresh.phases[:len(started)]) == started:  # the past as it ran: nothing to pin
        return fresh
    return resolve(cfg, past=ran, through_step=step)


def check_same_init(meta: dict, init_from: str) -> None:
    """Checkpoints win over init_from, but they must come from the same init_from."""
    recorded = meta.get("init_from", "")
    if init_from and recorded != init_from:
        raise ConfigError("model.init_from", init_from, f"this workdir's checkpoints were started from "
                          f"{recorded or 'scratch'!r}", "use a new --workdir, or drop --init-from to resume")


MODEL_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tie_embeddings",
                      "qkv_bias", "qk_norm")


def model_record(cfg: Config, dims: Any) -> dict:
    """What a checkpoint records of the model (`dims` is the run's ModelDims): its shape fields decide
    whether a resume may restore it."""
    return dict(preset=cfg.model.preset, param_dtype=cfg.model.param_dtype,
                **{k: getattr(dims, k) for k in MODEL_SHAPE_FIELDS})


def check_model_unchanged(recorded: dict | None, current: dict, step: int) -> None:
    """A changed model shape on resume is a config error naming the field (not a damaged checkpoint)."""
    for k in ("param_dtype", *MODEL_SHAPE_FIELDS):
        if recorded and k in recorded and recorded[k] != current[k]:
            by_preset = recorded.get("preset") != current["preset"]
            field = "model.preset" if by_preset else f"model.{k}"
            raise ConfigError(field, current["preset"] if by_preset else current[k],
                              f"the checkpoint at step {step} holds a model with {k}={recorded[k]!r} "
                              f"(preset {recorded.get('preset')!r}), this config gives {current[k]!r}",
                              "restore the run's model fields, or train in a new --workdir")


# ----------------------------------------------------------------------------------------------------------
# Where a (re)start begins.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Start:
    """Where a run starts: the newest good checkpoint's state, or nothing (step 0)."""

    step: int
    state: Any
    """The restored TrainState, or None at step 0."""
    plan: Plan
    """The plan to run: the config's, with the past pinned to what ran."""
    meta: dict
    """The restored checkpoint's meta; {} at step 0."""
    quarantined: list[str]
    """Checkpoints this start found damaged and moved to quarantine."""


def find_start(store: Any, cfg: Config, fresh: Plan, manifest: dict[str, str], model: dict, abstract: Any,
               shardings: Any, accept_changed_past: bool = False) -> Start:
    """The newest checkpoint in `store` (a checkpoint.CheckpointStore) that passes the config checks above and
    the store's content checks; damaged ones go to quarantine on the way. No checkpoint: step 0 with `fresh`.
    Only damaged ones: the store raises NoUsableCheckpoint (starting over would overwrite the run's history)."""
    plan = fresh

    def check_meta(meta: dict) -> None:  # the config checks of a candidate checkpoint, before its arrays load
        nonlocal plan
        check_same_init(meta, cfg.model.init_from)
        check_model_unchanged(meta.get("model"), model, meta["step"])
        plan = check_resume_plan(cfg, fresh, meta, meta["step"], manifest, accept_changed_past)

    before = set(store.quarantined())
    found = store.restore_latest(abstract, shardings, check_meta)
    if found is None:
        return Start(0, None, fresh, {}, [])
    step, state, meta = found
    return Start(step, state, plan, meta, sorted(set(store.quarantined()) - before))


def start_events(start: Start, cfg: Config) -> list[dict]:
    """What a start records in events.jsonl: checkpoints it quarantined, the resume, changed settings."""
    now = time.time()
    events = [dict(event="quarantine", step=start.step, checkpoint=name, time=now) for name in start.quarantined]
    if start.state is not None:
        events.append(dict(event="resume", step=start.step, time=now))
        changes = config_changes(start.meta["config"], cfg.to_dict()) if "config" in start.meta else {}
        if changes:
            events.append(dict(event="config_change", step=start.step, changes=changes, time=now))
    return events
