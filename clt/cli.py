"""`clt <verb>`: the command line. Each verb parses its arguments and calls one module; user errors print one
line (`clt: error: ...`) and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pathlib
import re
import signal
import sys
from typing import Sequence

from clt.config import ConfigError


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: shown as one line, exit 2."""
    errors: list[type[BaseException]] = [ConfigError]
    from clt.data.inputs import InputError
    from clt.data.prepare import PrepareError
    from clt.data.shards import ShardError
    from clt.data.store import StoreError
    from clt.data.tokenizer import TokenizerError
    from clt.hf.arch import HFError
    from clt.hf.safetensors import SafetensorsError
    from clt.launch import LaunchError
    from clt.resume import WorkdirBusy
    errors += [PrepareError, ShardError, StoreError, InputError, LaunchError, WorkdirBusy, HFError, SafetensorsError, TokenizerError]
    return tuple(errors)


# errno values that mean "the storage refused the write": fix the disk, then rerun the same command.
_STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "permission denied", errno.ENOENT: "file vanished"}
_STORAGE_TEXTS = {"No space left": "disk full", "File too large": "file size limit",
                  "Read-only file system": "read-only file system", "Disk quota": "disk quota exceeded"}


def storage_problem(exc: BaseException) -> str | None:
    """A one-line description when `exc` (or an exception it wraps: Orbax and tensorstore re-raise their
    own) is the storage refusing a write or losing a file; None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            where = f" at {exc.filename}" if exc.filename else ""
            return f"{_STORAGE_ERRNOS[exc.errno]}{where} ({exc.strerror})"
        text = str(exc)
        for needle, what in _STORAGE_TEXTS.items():
            if needle in text:
                return f"{what}: {text.splitlines()[0][:240]}"
        exc = exc.__cause__ or exc.__context__
    return None


def _from_orbax(exc: BaseException | None) -> bool:
    """Whether an exception, or one it wraps, was raised inside Orbax's code."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if "/orbax/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


# Orbax's (jax's) array serialization coroutines: when a save or restore batch aborts, the ones not yet started are
# never awaited, and Python warns about each when it collects them (often at exit, as "sys:1: RuntimeWarning").
ABANDONED_COROUTINE = r"coroutine '(async_serialize|async_deserialize)[^']*' was never awaited"


TENSORSTORE_STATUS = re.compile(r"(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|UNKNOWN|"
                                r"INTERNAL|UNAVAILABLE|ABORTED|CANCELLED): ")
"""How tensorstore's errors begin (an absl status code)."""


def _quiet_orbax_leftovers() -> None:
    """Keep a failed checkpoint write or read to what clt says about it. Orbax writes and reads arrays in background
    threads and event loops of its own, and the first failure reaches the main thread: a refused write becomes the
    one `clt: error:` line of `cmd_train`, a damaged checkpoint its quarantine warning. Their copies are dropped: the
    save threads' own records of a refused write (absl, with tracebacks), asyncio's "exception was never retrieved"
    for the aborted batch's other reads and writes, and the unraisable exceptions of those abandoned coroutines and
    of tensorstore completing them into an already-closed loop ("Event loop is closed"), and the warnings Python gives
    at exit for the aborted batch's serialization coroutines that never ran. Everything else is shown."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=ABANDONED_COROUTINE, category=RuntimeWarning)

    class _Copies(logging.Filter):
        def __init__(self, any_orbax_error: bool):
            super().__init__()
            self.any_orbax_error = any_orbax_error

        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if exc is None:
                return True
            # An aborted batch's reads fail inside tensorstore's own futures: no Orbax frame in their traceback,
            # only tensorstore's status code ("OUT_OF_RANGE: ... checkpoints/18/state/...") in the message.
            leftover = self.any_orbax_error and (_from_orbax(exc) or TENSORSTORE_STATUS.match(str(exc)) is not None)
            return storage_problem(exc) is None and not leftover

    logging.getLogger("absl").addFilter(_Copies(any_orbax_error=False))  # Orbax's other error records stay
    logging.getLogger("asyncio").addFilter(_Copies(any_orbax_error=True))
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or _from_orbax(exc):
            return
        previous(unraisable)

    sys.unraisablehook = hook


# ----------------------------------------------------------------------------------------------------------
# Verbs.
# ----------------------------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    """The resolved plan, after every check that needs no data: model shape, schedules, and with `--devices N`
    the mesh and batch sizes on a machine of N devices (without it, what needs no device count)."""
    from clt import config, plan_view, step

    cfg = config.load(args.config, args.overrides)
    if args.devices is not None and args.devices < 1:
        raise ConfigError("--devices", args.devices, "a machine has at least one device",
                          "give the target machine's device count, e.g. --devices 8")
    resolved = step.checked_plan(cfg, args.devices)
    if args.csv:
        print(plan_view.plan_csv(resolved))
        return 0
    total_tokens = resolved.total_rows * resolved.seq_len
    print(f"plan {resolved.digest()}: {len(resolved.phases)} phases, {resolved.total_steps} steps, "
          f"{plan_view.fmt_count(total_tokens)} tokens (seq_len {resolved.seq_len}, seed {resolved.seed})")
    rows = plan_view.plan_rows(resolved, wide=args.wide)
    print(plan_view.format_table(rows) if args.wide else
          plan_view.format_table(rows, max_width=120, cut=plan_view.PLAN_CUT))
    if args.plot:
        plan_view.plot_plan(resolved, args.plot)
        print(f"wrote {args.plot}")
    return 0


# `clt schedule` builds a one-phase plan; its errors are renamed to what the user typed.
_SCHEDULE_PATHS = {"phases.segment.steps": "--steps", "phases.0.steps": "--steps", "batch_size": "--batch-size",
                   "data.seq_len": "--seq-len", "phases.segment.schedule": "schedule", "phases.0.schedule": "schedule"}


def _schedule_key(path: str) -> str:
    for prefix in ("phases.segment.schedule.", "phases.0.schedule."):
        if path.startswith(prefix):
            return path[len(prefix):]
    return _SCHEDULE_PATHS.get(path, path)


def schedule_base(name: str | None, overrides: Sequence[str]) -> dict:
    """What NAME means on the command line: a preset in schedules/ when there is one (as a config's
    `schedule="NAME"` does), else a built-in kind. `kind=KIND` without NAME is the bare kind, also for the
    kinds that share a name with a preset (cosine, constant, power)."""
    import difflib

    from clt import config, schedule

    presets = config.preset_names("schedules")
    if name is None:
        if not any(o.partition("=")[0].strip() == "kind" for o in overrides):
            raise ConfigError("NAME", None, "no schedule given",
                              "name a preset or a kind (clt schedule cosine --steps 1000), or give kind=KIND")
        return {}
    if name in presets:
        return {"preset": name}
    if name in schedule.KINDS:
        return {"kind": name}
    close = difflib.get_close_matches(name, presets + list(schedule.KINDS), n=1)
    raise ConfigError("NAME", name, "neither a preset in schedules/ nor a built-in kind",
                      f"did you mean {close[0]!r}?" if close else
                      f"use a preset ({', '.join(presets)}) or a kind ({', '.join(schedule.KINDS)})")


def cmd_schedule(args: argparse.Namespace) -> int:
    """One LR segment on its own: `clt schedule cosine peak=1e-3 warmup=0.1 --steps 1000 --csv`."""
    import numpy as np

    from clt import config, plan, plan_view
    from clt.schedule import lr_at

    name, overrides = args.name, list(args.overrides)
    if name is not None and "=" in name:  # `clt schedule kind=cosine ...`: the first override, no NAME
        name, overrides = None, [name, *overrides]
    sched = config.apply_overrides(schedule_base(name, overrides), overrides)  # the config override grammar
    raw = dict(data=dict(domains={"all": "-"}, seq_len=args.seq_len), batch_size=args.batch_size,
               phases=(dict(name="segment", steps=args.steps, mixture={"all": 1.0}, schedule=sched),))
    try:
        resolved = plan.resolve(config.from_dict(raw))
    except ConfigError as e:
        raise ConfigError(_schedule_key(e.path), e.value, e.problem, e.fix) from None
    steps = np.arange(args.steps)
    lr = np.asarray(lr_at(resolved, steps))
    if args.plot:
        plan_view.plot_schedule(resolved.phases[0].schedule, steps, lr, args.plot)
        print(f"wrote {args.plot}")
    if args.csv or not args.plot:
        print("step,lr")
        print("\n".join(f"{s},{v:.6g}" for s, v in enumerate(lr)))
    return 0


def check_tokenizer_spec(spec: str) -> None:
    """byte, a tokenizer.json, or a model folder holding one (the rest is checked when it loads)."""
    path = pathlib.Path(spec)
    if spec == "byte" or path.is_file() or (path / "tokenizer.json").is_file():
        return
    if path.is_dir():
        raise ConfigError("--tokenizer", spec, "the folder has no tokenizer.json",
                          "give a Hugging Face model folder with its tokenizer files, a tokenizer.json, or byte")
    raise ConfigError("--tokenizer", spec, "no such file",
                      "give byte, the path of a Hugging Face tokenizer.json, or a model folder")


def cmd_prepare(args: argparse.Namespace) -> int:
    from clt import plan_view
    from clt.data import prepare

    if not 0 <= args.eval_fraction < 1:
        raise ConfigError("--eval-fraction", args.eval_fraction, "must be in [0, 1)", "use e.g. 0.05")
    if args.what == "demo":
        if args.files:
            raise ConfigError("FILE", args.files[0], "`clt prepare demo` reads no files (its text comes with Python)",
                              "drop the files, or use `clt prepare text --domain NAME --out DIR FILE...`")
        check_tokenizer_spec(args.tokenizer)
        summaries = list(prepare.prepare_demo(args.out, progress=not args.quiet and sys.stderr.isatty(),
                                              tokenizer=args.tokenizer).values())
    else:
        if not args.domain:
            raise ConfigError("--domain", None, f"`clt prepare {args.what}` needs a domain name", "add --domain NAME")
        if not args.files:
            raise ConfigError("FILE", None, "no inputs", f"list {args.what} files or globs after the options")
        if args.part_mb <= 0:
            raise ConfigError("--part-mb", args.part_mb, "must be positive", "use e.g. 16")
        if args.workers < 1:
            raise ConfigError("--workers", args.workers, "must be at least 1", "give a number of processes, e.g. 4")
        check_tokenizer_spec(args.tokenizer)
        summaries = [prepare.prepare(args.what, args.files, domain=args.domain, tokenizer=args.tokenizer,
                                     out=args.out, eval_fraction=args.eval_fraction, field=args.field,
                                     split=args.split, workers=args.workers, ray=args.ray, skip_bad=args.skip_bad,
                                     part_bytes=max(1, int(args.part_mb * 2**20)),
                                     progress=not args.quiet and sys.stderr.isatty())]
        if summaries[0]["skipped"]:
            print(f"skipped {summaries[0]['skipped']:,} bad record(s), e.g. {summaries[0]['skipped_examples'][0]}",
                  file=sys.stderr)
    tokenizers = sorted({sm["tokenizer"] for sm in summaries})
    where = args.out if args.what != "demo" else f"{args.out}/{{{','.join(sm['domain'] for sm in summaries)}}}"
    print(f"prepared {len(summaries)} domain{'s' if len(summaries) > 1 else ''} (tokenizer {', '.join(tokenizers)}): "
          f"{where}")
    print(plan_view.format_table(prepare.summary_rows(summaries)))
    return 0


def cmd_hf(args: argparse.Namespace) -> int:
    from clt.hf.arch import model_fields, read_config

    _setup_logging()
    progress = not args.quiet and sys.stderr.isatty()
    if args.dtype is not None and args.action != "export":
        raise ConfigError("--dtype", args.dtype, "only `clt hf export` writes weights", "drop --dtype")
    if args.action == "import":
        model_fields(read_config(args.source), f"{args.source}/config.json")  # before jax starts
        check_workdir(args.out)
        from clt.hf import convert
        s = convert.import_to_workdir(args.source, args.out, progress=progress)
        print(f"imported {s['architecture']} ({s['params'] / 1e6:.1f}M params, tokenizer {s['tokenizer']}) into "
              f"{args.out}/checkpoints/0; continue it with init_from=\"ckpt:{args.out}\"")
        return 0
    _quiet_orbax_leftovers()
    from clt.hf import convert
    s = convert.export_checkpoint(args.source, args.out, dtype=args.dtype, progress=progress)
    print(f"exported step {s['step']} of {s['source']} to {s['out']} ({s['architecture']}, {s['dtype']}, "
          f"{s['files']} safetensors file{'s' if s['files'] > 1 else ''}, tokenizer {s['tokenizer']}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({s['out']!r})")
    return 0


def _me() -> str:
    """'clt', or 'clt (process I/N)' in a job of several processes: every error names the process it came from."""
    from clt.launch import process_label

    label = process_label()
    return f"clt ({label})" if label else "clt"


# The options of each `clt launch` target; any other one given is refused (one line), so nothing is ignored.
_LAUNCH_OPTIONS = {"local": {"processes"},
                   "slurm": {"nodes", "gpus_per_node", "tasks_per_node", "partition", "time", "account", "name",
                             "dry_run"},
                   "gke": {"nodes", "accelerator", "image", "name", "dry_run"}}
_LAUNCH_REQUIRED = {"local": ("processes",), "slurm": ("nodes", "gpus_per_node"), "gke": ("accelerator", "image")}


def _check_launch_options(args: argparse.Namespace) -> None:
    from clt.launch import LaunchError

    flag = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    for dest in sorted(set().union(*_LAUNCH_OPTIONS.values()) - _LAUNCH_OPTIONS[args.where]):
        if getattr(args, dest) not in (None, False):
            users = [w for w, opts in _LAUNCH_OPTIONS.items() if dest in opts]
            raise LaunchError(f"{flag(dest)} is for `clt launch {' / '.join(users)}`, not {args.where}")
    for dest in _LAUNCH_REQUIRED[args.where]:
        if getattr(args, dest) is None:
            raise LaunchError(f"clt launch {args.where} needs {flag(dest)}")


def cmd_launch(args: argparse.Namespace) -> int:
    from clt import config, launch

    _check_launch_options(args)
    if args.where != "local":
        if args.where == "slurm" and "://" not in args.workdir:
            check_workdir(args.workdir)
        return launch.launch_job(args.where, args.config, args.workdir, args.overrides, nodes=args.nodes,
                                 gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                                 account=args.account, accelerator=args.accelerator, image=args.image,
                                 name=args.name, dry_run=args.dry_run, tasks_per_node=args.tasks_per_node or 1)
    config.load(args.config, args.overrides)  # a bad config is one line here, not once per process
    check_workdir(args.workdir)
    return launch.launch_local(args.config, args.workdir, args.overrides, args.processes, quiet=args.quiet)


def _sweep_job(args: argparse.Namespace) -> dict:
    """The job options of `clt sweep --launch TARGET` as keyword arguments of clt.launch: those of `clt launch
    TARGET` but --name (each run's job is named after it) and --dry-run (the sweep's own); others are refused."""
    from clt.launch import LaunchError

    flag = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    own = {"name", "dry_run"}
    allowed = _LAUNCH_OPTIONS[args.launch] - own if args.launch else set()
    for dest in sorted(set().union(*_LAUNCH_OPTIONS.values()) - own - allowed):
        if getattr(args, dest) is not None:
            users = [w for w, opts in _LAUNCH_OPTIONS.items() if dest in opts]
            raise LaunchError(f"{flag(dest)} is for `clt sweep --launch {' / '.join(users)}`"
                              + (f", not {args.launch}" if args.launch else ""))
    for dest in _LAUNCH_REQUIRED.get(args.launch, ()):
        if getattr(args, dest) is None:
            raise LaunchError(f"clt sweep --launch {args.launch} needs {flag(dest)}")
    job = {dest: getattr(args, dest) for dest in allowed}
    if args.launch == "slurm":
        job["tasks_per_node"] = args.tasks_per_node or 1
    return job


def cmd_sweep(args: argparse.Namespace) -> int:
    """`clt sweep SWEEP_CONFIG --workdir DIR`: every point is checked, then each run trains here (or is
    launched) one after another, finished ones skipped; `clt sweep report DIR`: the results table and plots.
    A bad sweep is one `clt: error:` line per bad point, exit 2, before anything runs."""
    from clt import launch, sweep

    if args.target[0] == "report":
        return _sweep_report(args)
    if not args.workdir:
        raise ConfigError("--workdir", None, "clt sweep needs a folder for its runs", "add --workdir DIR")
    if args.out:
        raise ConfigError("--out", args.out, "is for `clt sweep report`", "drop it")
    job = _sweep_job(args)
    if args.launch != "gke":  # a GKE sweep's folder is in a bucket (checked for each job)
        check_workdir(args.workdir)
    try:
        spec = sweep.load_sweep(args.target[0], args.target[1:])
        points = sweep.expand(spec)
        chosen = sweep.select(points, args.only)
        devices = None  # `clt train` here counts its devices itself; this process starts no JAX backend
        if args.launch in ("slurm", "gke"):
            nodes, per_node, _ = launch.job_shape(args.launch, args.nodes, args.gpus_per_node, args.accelerator,
                                                  job.get("tasks_per_node", 1))
            devices = nodes * per_node
        sweep.validate(spec, points, devices)
    except sweep.SweepError as e:
        for line in e.lines:
            print(f"{_me()}: error: {line}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(sweep.dry_run_table(spec, chosen, args.workdir))
        if args.launch not in ("slurm", "gke"):
            return 0
    rc = sweep.run_sweep(spec, chosen, args.workdir, where=args.launch, job=job, dry_run=args.dry_run,
                         quiet=args.quiet)
    if args.launch in (None, "local"):
        print(f"report: {sweep.write_sweep_report(args.workdir)}")
    return rc


def _sweep_report(args: argparse.Namespace) -> int:
    """`clt sweep report DIR [--out OUT]`: results.md's path, then its table as text."""
    from clt import sweep

    if len(args.target) != 2:
        raise ConfigError("DIR", " ".join(args.target[1:]) or None, "`clt sweep report` takes one folder",
                          "clt sweep report DIR (the sweep's --workdir)")
    for dest in ("workdir", "only", "launch"):
        if getattr(args, dest) is not None:
            raise ConfigError(f"--{dest}", getattr(args, dest), "is for running a sweep, not its report", "drop it")
    _quiet_libraries()
    res = sweep.read_results(args.target[1])
    print(sweep.write_sweep_report(args.target[1], out=args.out, res=res))
    print(sweep.summary_table(res))
    return 0


def check_workdir(path: str) -> None:
    """A --workdir that can hold a run: a folder (or creatable as one) that this process may write to."""
    wd = pathlib.Path(path)
    if wd.exists() and not wd.is_dir():
        raise ConfigError("--workdir", path, "is a file, not a folder", "give a folder (it is created when missing)")
    existing = next(p for p in (wd, *wd.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("--workdir", path, f"cannot be created: {existing} is a file", "give a path outside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == wd else f"cannot be created: {existing} is not writable"
        raise ConfigError("--workdir", path, where, "fix its permissions or give another folder")


def check_init_source(spec: str, path: str) -> None:
    """`ckpt:DIR[@STEP]` whose DIR exists, before anything heavy (the restore itself checks the rest)."""
    from clt import config

    config.check_init_from(spec, path)
    kind, _, rest = spec.partition(":")
    folder = re.sub(r"@\d+$", "", rest) if kind == "ckpt" else rest
    if spec and not pathlib.Path(folder).is_dir():
        what = "a Hugging Face model folder" if kind == "hf" else "the --workdir of a clt run"
        raise ConfigError(path, spec, f"no such folder {folder}", f"give {what}")
    if kind == "hf":  # the architecture and RoPE type, before jax starts (the tensors are checked at load)
        from clt.hf.arch import HFError, model_fields, read_config
        try:
            model_fields(read_config(folder), f"{folder}/config.json")
        except HFError as e:
            raise ConfigError(path, spec, str(e), "give a supported Hugging Face model folder") from None


def cmd_train(args: argparse.Namespace) -> int:
    from clt import config, launch
    from clt.metrics import TensorBoardSink, WandbSink

    # Joins the job's other processes, if any, before any other JAX call: the flags, else the environment.
    job = launch.job_env(args.coordinator, args.num_processes, args.process_id)
    os.environ.update({k: job[k] for k in (launch.ENV_COORDINATOR, launch.ENV_PROCESSES, launch.ENV_PROCESS_ID)
                       if k in job})  # this process's messages name it (launch.process_label)
    launch.initialize(job)
    _setup_logging()
    _quiet_orbax_leftovers()
    cfg = config.load(args.config, args.overrides)
    # Everything the user can get wrong is checked before jax starts and the data is read.
    check_workdir(args.workdir)
    if args.init_from:
        check_init_source(args.init_from, "--init-from")
    elif cfg.model.init_from:
        check_init_source(cfg.model.init_from, "model.init_from")
    if cfg.log.tensorboard:
        TensorBoardSink.require()
    if cfg.log.wandb.enabled:
        WandbSink.require(cfg.log.wandb.project)

    from clt import train
    from clt.checkpoint import NoUsableCheckpoint

    try:
        result = train.train(cfg, args.workdir, init_from=args.init_from,
                             accept_changed_past=args.accept_changed_past, progress=not args.quiet)
    except train.StopRun as e:
        print(f"{_me()}: run stopped: {e} (checkpoints in {args.workdir}/checkpoints)", file=sys.stderr)
        return 1
    except NoUsableCheckpoint as e:
        print(f"{_me()}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - storage faults are one line; anything else keeps its traceback
        problem = storage_problem(e)
        if problem is None:
            raise
        print(f"{_me()}: error: {problem}; nothing partial was kept: fix the storage and rerun the same command to "
              f"resume from the last checkpoint", file=sys.stderr)
        return 1
    if launch.is_secondary():
        return 0  # one summary for a job: process 0's
    if result.get("already_finished"):
        print(f"already finished at step {result['final_step']}: nothing to do ({args.workdir})")
        return 0
    if result.get("stopped") == "preempted":
        print(f"preempted at step {result['final_step']}: resume with "
              f"`clt train {args.config} --workdir {args.workdir}` (same overrides)")
    else:
        print(f"done: {result['final_step']} steps; metrics in {args.workdir}/metrics.jsonl, "
              f"events in {args.workdir}/events.jsonl")
    return 0


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is logged (pytest and notebooks swap it between runs)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def _setup_logging() -> None:
    """clt's log lines on stderr; absl (imported by jax/orbax) owns the root logger, so clt gets its own."""
    logger = logging.getLogger("clt")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    from clt.launch import is_secondary

    if is_secondary():  # a job's log is process 0's
        logger.setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    """Read-only verbs print their answer only: absl (orbax's logger) warns, e.g. that a manager is read-only,
    and XLA's C++ logs start with the backend. Called before those libraries are imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # absl comes with jax; without it there is nothing to quiet
        pass


def cmd_report(args: argparse.Namespace) -> int:
    """report.md, stability.json and PNGs of a run, finished or in progress, from its workdir alone."""
    _quiet_libraries()
    from clt import report

    print(report.write_report(args.workdir, out=args.out))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Where a run stands (running, finished, stopped, preempted, interrupted), from its workdir; no jax."""
    import json

    from clt import status

    st = status.read_status(args.workdir)
    print(json.dumps(st) if args.json else status.format_status(st))
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    _quiet_libraries()  # read-only managers warn about being read-only
    from clt import checkpoint, config, plan_view

    directory = pathlib.Path(args.workdir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError("workdir", args.workdir, "has no checkpoints/ folder", "give the --workdir of a clt run")
    store = checkpoint.CheckpointStore(directory, config.CheckpointConfig(), read_only=True)
    if args.action == "ls":
        rows = checkpoint.describe(store)
        print(plan_view.format_table(rows) if rows else f"no checkpoints in {directory}")
    else:
        steps = store.steps()
        step = args.step if args.step is not None else (steps[-1] if steps else None)
        if step not in steps:
            raise ConfigError("step", step, f"no such checkpoint in {directory}", f"pick one of {steps}")
        meta = store.meta(step)
        plan = meta.pop("plan")
        print(checkpoint.meta_json(meta))
        print(f"plan: {len(plan['phases'])} phases, {plan['phases'][-1]['end']} steps (digest {meta.get('digest')})")
    store.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """`clt replay export WORKDIR OUT` and `clt replay info PATH` (an exported buffer or a workdir)."""
    _quiet_libraries()
    from clt import replay

    path = pathlib.Path(args.path)
    if args.action == "export" and not args.out:
        raise ConfigError("OUT", None, "`clt replay export` needs a destination", "clt replay export WORKDIR OUT")
    if args.action == "info" and (path / "index.json").exists():
        snap = replay.BufferSnapshot(path)
        print(f"replay buffer {path}: {snap.fill}/{snap.capacity} sequences of {snap.seq_len + 1} tokens, "
              f"{snap.index['seen']} rows seen by step {snap.index['step']}")
        total = max(snap.fill, 1)
        for d, n in snap.composition().items():
            print(f"  {d:<12} {n:>8}  {n / total:6.1%}")
        return 0
    no_buffer = f"{path}: this run keeps no replay buffer (replay_buffer.capacity = 0)"
    if args.action == "export":
        exported = replay.export(path, args.out)
        if exported is None:
            print(no_buffer)
            return 0
        print(f"exported {exported.fill} sequences (step {exported.index['step']}) to {exported.path}; "
              f"use it with replay_buffer.load={str(exported.path)!r}")
        return 0
    found = replay.buffer_of_workdir(path)
    if found is None:
        print(no_buffer)
        return 0
    buffer, step = found
    snap = buffer.snapshot(step)
    print(f"{path}: buffer at step {step}: {snap.fill}/{buffer.capacity} sequences; composition {snap.composition()}; "
          f"snapshots at steps {buffer.snapshot_steps()}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parser.
# ----------------------------------------------------------------------------------------------------------
def versions() -> str:
    """`clt --version`: clt and the libraries whose versions decide numerics and checkpoint formats."""
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "clt":  # run from a source tree that was never installed
                from clt import __version__
                return __version__
            return "not installed"

    libs = ", ".join(f"{d} {version(d)}" for d in ("jax", "flax", "orbax-checkpoint"))
    return f"clt {version('clt')} ({libs})"


class _Version(argparse.Action):
    """Prints `versions()` on one line (argparse's own version action wraps long lines)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the clt, jax, flax and orbax versions")

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The job shape options of `clt launch` and `clt sweep --launch` (each target takes only its own)."""
    from clt.launch import ACCELERATORS  # standard library only: the parser stays quick to build

    p.add_argument("--processes", type=int,
                   help="local: processes; the CPU devices of XLA_FLAGS (or 1 each) are split evenly between them")
    p.add_argument("--nodes", type=int, help="slurm, gke: nodes, one process each (a TPU slice fixes it)")
    p.add_argument("--gpus-per-node", type=int,
                   help="slurm: GPUs per node; 0 for CPU nodes (the CPU devices of XLA_FLAGS per task)")
    p.add_argument("--tasks-per-node", type=int,
                   help="slurm: clt train processes per node (default 1: one per node, all its GPUs)")
    p.add_argument("--partition", help="slurm: the partition (#SBATCH --partition)")
    p.add_argument("--time", help="slurm: the time limit, e.g. 24:00:00 (the job requeues itself when it is near)")
    p.add_argument("--account", help="slurm: the account to charge")
    p.add_argument("--accelerator", help="gke: the node type: " + ", ".join(ACCELERATORS))
    p.add_argument("--image", help="gke: a container image with clt installed")


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """`clt sweep SWEEP_CONFIG --workdir DIR [...]` and `clt sweep report DIR`."""
    p = sub.add_parser("sweep", help="train a grid of overrides of one config, one run per point, resumable; "
                       "`clt sweep report DIR`: the results table and plots")
    p.add_argument("target", nargs="+", metavar="SWEEP_CONFIG [KEY=VALUE ...] | report DIR",
                   help="a sweep config (configs/sweeps/) and overrides for every run (size=N multiplies the "
                        "sweep's scaled keys: its size knob); or `report` and a sweep's --workdir")
    p.add_argument("--workdir", help="the sweep's folder: one folder per run in it, and sweep.json")
    p.add_argument("--dry-run", action="store_true",
                   help="check every point and print the runs and their overrides; run nothing (with --launch "
                        "slurm|gke: also write each job file, as `clt launch --dry-run` does)")
    p.add_argument("--only", metavar="NAME_GLOB", help="run only the runs whose name matches, e.g. 'replay=0.25,*'")
    p.add_argument("--launch", choices=["local", "slurm", "gke"],
                   help="run each run through `clt launch local` (--processes N) or submit it as a SLURM job or "
                        "a GKE JobSet (the options of `clt launch`); default: `clt train` here, one after another")
    add_job_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", help="report: the folder to write (default: DIR/report)")
    p.set_defaults(func=cmd_sweep)


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    """`clt launch local|slurm|gke` and its options (each target takes only its own: see _LAUNCH_OPTIONS)."""
    p = sub.add_parser("launch", help="run `clt train` as a job of several processes joined by jax.distributed: "
                       "on this machine, or as a SLURM job or a GKE JobSet")
    p.add_argument("where", choices=["local", "slurm", "gke"],
                   help="local: N processes on this machine (127.0.0.1); slurm: an sbatch job, one process per "
                        "node; gke: a JobSet, one pod per node")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for `clt train`")
    p.add_argument("--workdir", required=True,
                   help="slurm: a folder on the shared file system; gke: gs://BUCKET/PATH (mounted in every pod)")
    add_job_options(p)
    p.add_argument("--name", help="slurm, gke: the job's name (default: clt-<workdir's last folder>)")
    p.add_argument("--dry-run", action="store_true",
                   help="slurm, gke: write the job file and its records into WORKDIR/launch/ and print it; "
                        "submit nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_launch)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (verbs listed in its help) and each verb's own parser, by verb."""
    ap = argparse.ArgumentParser(prog="clt", description="Continual pre-training orchestrator.")
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("plan", help="show a config's resolved phase plan")
    p.add_argument("action", choices=["show"])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, anywhere after the verb, e.g. phases.shift.replay=0.25")
    p.add_argument("--csv", action="store_true", help="one row per step: step,phase,lr,w/<domain>...")
    p.add_argument("--plot", metavar="FILE.png", help="draw LR and mixture weights over steps")
    p.add_argument("--wide", action="store_true", help="every column and full schedules (default: fits 120 columns)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="also check the mesh and batch sizes for a machine of N devices")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schedule", help="show one LR segment (a schedules/ preset or a built-in kind)")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a preset in schedules/ (cosine, power, ...), else a kind: constant|linear|cosine|"
                        "inverse_sqrt|wsd|infinite|power; leave it out and give kind=KIND for the bare kind")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="schedule fields, e.g. peak=1e-3 warmup=0.1 (kind=cosine)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32, help="for the power schedule's token count")
    p.add_argument("--seq-len", type=int, default=1024, help="for the power schedule's token count")
    p.add_argument("--csv", action="store_true")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("prepare", help="tokenize a corpus into a prepared domain (a folder, gs:// or s3://)")
    p.add_argument("what", choices=["text", "jsonl", "parquet", "demo"])
    p.add_argument("files", nargs="*", metavar="INPUT",
                   help="files or globs (.gz/.zst read as compressed); parquet: also a `datasets` save_to_disk folder")
    p.add_argument("--out", required=True, help="the domain's folder, or gs://BUCKET/PREFIX, s3://BUCKET/PREFIX")
    p.add_argument("--domain")
    p.add_argument("--tokenizer", default="byte",
                   help="byte, a Hugging Face tokenizer.json, or a model folder (its tokenizer and BOS/EOS ids)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--field", default="text", help="jsonl/parquet: the key or column holding the text")
    p.add_argument("--split", choices=["file", "paragraph"], default="file",
                   help="text: one document per file, or per blank-line-separated paragraph")
    p.add_argument("--workers", type=int, default=1, help="tokenize with N processes (same output as 1)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="tokenize on a Ray cluster (ADDRESS as for ray.init, or 'local'); needs clt[ray]")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    p.add_argument("--part-mb", type=float, default=16,
                   help="input MiB per part, the unit of work of a worker (and of resuming); output is the same")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a config's phase plan (resumes from the workdir's checkpoints)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for `clt plan show`")
    p.add_argument("--workdir", required=True)
    p.add_argument("--init-from", help="start from these weights (fresh optimizer, step 0): ckpt:WORKDIR[@STEP] "
                                       "of a clt run, or hf:DIR of a Hugging Face model folder")
    p.add_argument("--accept-changed-past", action="store_true",
                   help="resume even though phases that already ran were edited")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join a job of several processes (run on each host; process 0 listens on HOST:PORT); "
                        "the same as CLT_COORDINATOR, which clt launch sets")
    p.add_argument("--num-processes", type=int, help="with --coordinator: the job's process count")
    p.add_argument("--process-id", type=int, help="with --coordinator: this process's index, 0 to N-1")
    p.set_defaults(func=cmd_train)

    add_launch_parser(sub)
    add_sweep_parser(sub)

    p = sub.add_parser("report", help="write a run's report (report.md, stability.json, plots); prints its path")
    p.add_argument("workdir")
    p.add_argument("--out", help="folder for the report (default: WORKDIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="where a run stands: state, step, phase, losses, checkpoint, alerts, ETA")
    p.add_argument("workdir")
    p.add_argument("--json", action="store_true", help="one JSON object (for scripts)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ckpt", help="list or describe a run's checkpoints")
    p.add_argument("action", choices=["ls", "info"])
    p.add_argument("workdir")
    p.add_argument("--step", type=int)
    p.set_defaults(func=cmd_ckpt)

    p = sub.add_parser("hf", help="import a Hugging Face model into a workdir, or export a checkpoint as one")
    p.add_argument("action", choices=["import", "export"])
    p.add_argument("source", metavar="SOURCE", help="import: a Hugging Face model folder (config.json, "
                   "*.safetensors, tokenizer files); export: WORKDIR, WORKDIR@STEP or a checkpoint folder")
    p.add_argument("out", metavar="OUT", help="import: the workdir to create; export: the folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="export: the safetensors dtype (default: the run's model.param_dtype)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_hf)

    p = sub.add_parser("replay", help="export or inspect a run's persistent replay buffer")
    p.add_argument("action", choices=["export", "info"])
    p.add_argument("path", help="export: the run's workdir; info: a workdir or an exported buffer")
    p.add_argument("out", nargs="?", help="export: the folder to write")
    p.set_defaults(func=cmd_replay)
    return ap, dict(sub.choices)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options and positionals in any order, for every verb (`clt prepare text --out D --domain x a.txt` and
    `clt prepare text a.txt --out D --domain x` are the same), `key=value` overrides anywhere after the verb.

    argparse's intermixed parsing does not support subparsers, so the verb is found here and the rest is
    parsed by that verb's own parser."""
    top, verbs = build_parser()
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in verbs:
        top.parse_args(argv)  # --version, --help, a misspelt verb: argparse answers and exits
        top.error("give a verb: " + ", ".join(verbs))
    top.parse_args(argv[:at])  # options before the verb (only --version / --help exist)
    args = verbs[argv[at]].parse_intermixed_args(argv[at + 1:])
    args.verb = argv[at]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # A file-size limit (ulimit -f) must fail the write with EFBIG, not kill the process mid-save.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"{_me()}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`clt plan show --csv | head`): stop quietly, like any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
