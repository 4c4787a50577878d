"""`clt status WORKDIR`: where a run stands, read from its workdir alone, in well under a second.

A continual pre-training run lives for weeks across preemptions, so "is it running, and if not, why not and
what do I type" must be answerable without a device and without waiting for jax or Orbax to import: this
module reads plan.json, metrics.jsonl, events.jsonl, the checkpoint folder names and the workdir lock, and
nothing else. The state is decided in this order:
- running: a live process holds the workdir lock (`clt.resume.lock_holder`), whatever the files say;
- stopped: the last `stopped` event (an alert with `on_alert="stop"`, repeated skipped updates) has no later
  `resume` (a `clt train` that resumed it and died since is interrupted, not stopped);
- preempted: the last end-of-process event is `preempted`, before the plan's end;
- finished: a `finished` event, a `checkpoint` event or a checkpoint folder at the plan's last step;
- interrupted: none of these: the process died (killed, crashed, machine lost) without a word.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Any

from clt.config import ConfigError
from clt.report import Run, load_run
from clt.resume import PLAN_FILE, lock_holder

LAST_ALERTS = 3
"""How many alert messages the text shows (the JSON has the same ones; `clt report` lists all)."""
RATE_ROWS = 5
"""Log rows whose median tokens/s gives the ETA: the median ignores the first row after a (re)start, which
includes compilation."""
_ENDS = ("resume", "preempted", "stopped", "finished")
"""Events that mark a process ending (or a new one starting): their order decides stopped vs preempted."""


def checkpoint_folders(workdir: str | pathlib.Path) -> tuple[list[int], list[str]]:
    """(steps of finalised checkpoints, entries of checkpoints/quarantine/) from folder names alone.

    Orbax names a finished checkpoint `<step>` and one being written `<step>.orbax-checkpoint-tmp-*`, so a
    numeric name is a complete save; quarantined ones are `<step>-<reason>` and are never restored."""
    folder = pathlib.Path(workdir) / "checkpoints"
    steps = sorted(int(p.name) for p in folder.glob("*") if p.is_dir() and p.name.isdigit())
    quarantine = folder / "quarantine"
    held = sorted((p.name for p in quarantine.iterdir()), key=_step_first) if quarantine.is_dir() else []
    return steps, held


def _step_first(name: str) -> tuple[int, str]:
    head = name.split("-", 1)[0]
    return (int(head) if head.isdigit() else -1, name)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _state(run: Run, holder: dict | None, ckpt_steps: list[int]) -> tuple[str, str | None, int | None]:
    """(state, stop reason, step of the event that decided it); see the module docstring for the order."""
    total = run.plan.total_steps
    if holder is not None:
        return "running", None, None
    ends = [e for e in run.events if e.get("event") in _ENDS]
    last = ends[-1] if ends else {}
    if last.get("event") == "stopped":
        return "stopped", str(last.get("reason", "?")), last.get("step")
    if last.get("event") == "preempted" and _num(last.get("step")) and last["step"] < total:
        return "preempted", None, last["step"]
    done = [e for e in run.events if e.get("event") in ("finished", "checkpoint") and e.get("step") == total]
    if done or total in ckpt_steps:
        return "finished", None, total
    return "interrupted", None, None


def _eta(run: Run, progress: int) -> dict | None:
    """Seconds left at the recent throughput: the tokens still to train (each remaining phase's steps x its
    batch x seq_len) over the median tokens/s of the last log rows. Evals and saves are not counted."""
    rates = [r["tokens_per_s"] for r in run.rows if _num(r.get("tokens_per_s")) and r["tokens_per_s"] > 0]
    if not rates or progress >= run.plan.total_steps:
        return None
    tps = statistics.median(rates[-RATE_ROWS:])
    seq = run.plan.seq_len
    tokens = sum(max(0, p.end - max(p.start, progress)) * p.batch_size * seq for p in run.plan.phases)
    phase = run.plan.phase_at(progress)
    return dict(seconds=tokens / tps, tokens_per_s=tps, seconds_per_step=phase.batch_size * seq / tps)


def read_status(workdir: str | pathlib.Path) -> dict:
    """Everything `clt status` shows, as one JSON-able dict (the `--json` output)."""
    wd = pathlib.Path(workdir)
    if not (wd / PLAN_FILE).is_file():
        raise ConfigError("WORKDIR", str(wd), "not a clt workdir (no plan.json)", "give the --workdir of a clt run")
    run = load_run(wd)
    plan, total = run.plan, run.plan.total_steps
    holder = lock_holder(wd)
    ckpt_steps, quarantine = checkpoint_folders(wd)

    # Every event step and checkpoint counts updates applied, as eval rows do: the newest of them is progress
    # (log rows come every log.every steps, a checkpoint or a preemption may be later).
    event_steps = [e["step"] for e in run.events if _num(e.get("step"))]
    progress = int(max([run.progress, *event_steps, *ckpt_steps]))
    state, reason, state_step = _state(run, holder, ckpt_steps)
    phase = plan.phase_at(min(progress, total - 1))

    logs = [r for r in run.rows if "loss" in r and not any(k.startswith("eval/") for k in r)]
    train = dict(step=logs[-1]["step"], loss=logs[-1]["loss"], lr=logs[-1].get("lr")) if logs else None
    evals: dict[str, dict] = {}
    for r in run.evals:
        for d in plan.domains:
            if f"eval/{d}/loss" in r:  # a non-finite loss (stored as "nan") is shown, not skipped
                evals[d] = dict(step=r["step"], loss=r[f"eval/{d}/loss"], bpb=r.get(f"eval/{d}/bpb"))

    kinds = {e["step"]: e.get("kind", "?") for e in run.events if e.get("event") == "checkpoint"}
    kinds.update({e["step"]: e["event"] for e in run.events  # saves that write no checkpoint event
                  if e.get("event") in ("preempted", "stopped") and e.get("step") in ckpt_steps
                  and e["step"] not in kinds})
    if ckpt_steps:
        last_ckpt = dict(step=ckpt_steps[-1], kind=kinds.get(ckpt_steps[-1]), source="checkpoints/")
    elif kinds:  # folder gone (copied without it, or deleted): say what the events recorded
        step = max(kinds)
        last_ckpt = dict(step=step, kind=kinds[step], source="events.jsonl")
    else:
        last_ckpt = None

    alerts = [e for e in run.events if e.get("event") == "alert"]
    metrics = wd / "metrics.jsonl"
    return dict(
        workdir=str(wd), state=state, reason=reason, state_step=state_step, holder=holder,
        step=progress, total_steps=total, percent=round(100 * progress / total, 1) if total else 100.0,
        phase=dict(name=phase.name, index=phase.index, phases=len(plan.phases), start=phase.start, end=phase.end),
        train=train, evals=evals, checkpoint=last_ckpt, checkpoints=ckpt_steps, quarantine=quarantine,
        alerts=dict(count=len(alerts), last=[dict(step=a.get("step"), message=a.get("message", a.get("alert", "")))
                                             for a in alerts[-LAST_ALERTS:]]),
        eta=_eta(run, progress) if state == "running" else None,
        updated_s=round(time.time() - metrics.stat().st_mtime, 1) if metrics.exists() else None,
        digest=run.digest)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _fmt(v: Any, spec: str) -> str:
    """A number in `spec`; anything else (a non-finite loss is stored as the string "nan") as it is."""
    return format(v, spec) if _num(v) else str(v)


def format_status(st: dict) -> str:
    """The compact text `clt status` prints: the state, one line per topic, and what to do next."""
    ck = st["checkpoint"]
    start = f"step {ck['step']}" if ck else "step 0 (no checkpoint yet)"
    resume = f"`clt train` with the same config, --workdir and overrides resumes from {start}"
    state, nxt = st["state"], None
    if state == "running":
        h = st["holder"]
        head = f"running (pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')})"
        if st["updated_s"] is not None:
            head += f"; last metrics row {_duration(st['updated_s'])} ago"
    elif state == "finished":
        head = "finished"
    elif state == "stopped":
        head, nxt = f"stopped at step {st['state_step']}: {st['reason']}", f"fix the cause, then {resume}"
    elif state == "preempted":
        head, nxt = f"preempted at step {st['state_step']}", resume
    else:
        head, nxt = "interrupted (not running; no finish, stop or preemption recorded: the process died)", resume
    ph = st["phase"]
    lines = [f"{st['workdir']}: {head}",
             f"step    {st['step']}/{st['total_steps']} ({st['percent']:g}%), phase {ph['name']} "
             f"({ph['index'] + 1}/{ph['phases']}, steps {ph['start']}-{ph['end'] - 1})"]
    if st["train"]:
        t = st["train"]
        lines.append(f"train   loss {_fmt(t['loss'], '.4f')} at step {t['step']}, lr {_fmt(t['lr'], '.2e')}")
    if st["evals"]:
        lines.append("eval    " + " | ".join(f"{d} {_fmt(e['loss'], '.4f')} at step {e['step']}"
                                             for d, e in st["evals"].items()))
    if ck:
        kind = f" ({ck['kind']})" if ck["kind"] else ""
        where = "" if ck["source"] == "checkpoints/" else " (from events.jsonl; no checkpoints/ folder)"
        on_disk = f"; on disk: {', '.join(map(str, st['checkpoints']))}" if len(st["checkpoints"]) > 1 else ""
        lines.append(f"ckpt    step {ck['step']}{kind}{where}{on_disk}")
    else:
        lines.append("ckpt    none yet")
    if st["quarantine"]:
        lines.append(f"        quarantined (damaged, never restored): {', '.join(st['quarantine'])}")
    a = st["alerts"]
    if a["count"]:
        shown = f", the last {len(a['last'])}" if a["count"] > len(a["last"]) else ""
        lines.append(f"alerts  {a['count']}{shown}:")
        lines += [f"        step {x['step']}: {x['message']}" for x in a["last"]]
    if st["eta"]:
        e = st["eta"]
        lines.append(f"eta     ~{_duration(e['seconds'])} ({e['tokens_per_s'] / 1e3:.1f}k tok/s, "
                     f"{e['seconds_per_step']:.2f} s/step; evals and saves not counted)")
    if nxt:
        lines.append(f"next    {nxt}")
    return "\n".join(lines)
