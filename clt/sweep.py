"""Ablation sweeps: a grid of overrides of one experiment config -> one run per point -> a results table and plots.

A recipe is chosen by ablation (replay share x re-warm peak x schedule x upsampling window, over seeds). A sweep
config is a `get_config()` file (configs/sweeps/) with these fields:

    c.base = "configs/demo.py"          # the experiment config; a relative path is from the current folder
    c.overrides = ("monitor.every=50",) # key=value overrides of every run, applied before the axes (optional)
    c.axes = (                          # the grid: the product of these entries
        dict(key="phases.shift.replay", values=(0.0, 0.25), label="replay"),
        dict(zip=(                      # a zipped group: its axes move together (equal lengths)
            dict(key="phases.shift.schedule.peak", values=(1e-3, 3e-3), label="peak"),
            dict(key="phases.shift.schedule.warmup", values=(10, 40)),   # label: the key's last part
        )),
        dict(key="phases.shift.schedule", values=("rewarm_cosine", dict(kind="wsd", peak=2e-3, decay=0.2)),
             names=("cos", "wsd")),     # names: how values that are no number or word appear in run names
    )
    c.seeds = (0, 1)                    # every point once per seed, through the config's `seed` (optional)
    c.metrics = ("final/*", "gap/shift/*", "tokens_per_s")  # which metrics the report shows (fnmatch patterns)
    c.name = "recipe"                   # the sweep's name (optional; default: the file's name)
    c.scaled = ("budget.steps", "monitor.every")  # what `size=N` on the command line multiplies (optional)

An axis `key` is any dotted override key of `clt train` (phases by name or index), each value a Python value
as an override would give it. The example is 2 x 2 x 2 points x 2 seeds = 16 runs. `size=N` among the command
line's overrides is the sweep's size knob: every `scaled` key (a whole number of steps in the base config after
the file's overrides) is multiplied by N, e.g. the budget and the eval intervals together for a larger machine.

Runs: each run is named by its axis values alone, shortened by the axis labels (`replay=0.25,peak=1e-3,
warmup=10,schedule=cos,seed=1`), and lives in `DIR/<name>/`, so running the same sweep again finds the same
folders: finished runs are skipped, interrupted ones resume through `clt train`'s own resume path. Before
anything runs every point is built into a validated Config by clt's loader and its plan resolved and checked
(`step.checked_plan`); every bad point (and a name shared by two points, and a metric pattern that names
nothing) is one line, and nothing runs. `DIR/sweep.json` records the expanded grid, so `clt sweep report DIR`
works from the folder alone, also mid-sweep.

Each run is its own `clt train` process, one after another, rather than `train()` called in this process:
- a run's device memory, compiled programs and signal handlers end with its process, so run 40 of a sweep
  trains as run 1 did (and this process never starts a JAX backend that would hold an accelerator's memory);
- a run that crashes or stops itself (a diverging re-warm peak is a legitimate ablation result) is recorded
  as failed and the sweep goes on; rerunning the sweep resumes it;
- the run is exactly the `clt train` command that sweep.json records, that a person can rerun by hand, and
  that `--launch local|slurm|gke` hands to clt/launch.py instead (the same functions as `clt launch`).
The cost is a process start per run (importing JAX, loading the data: seconds), small next to a real run.

Metrics (METRIC_KINDS), computed from a run's metrics.jsonl by clt.monitor's definitions: `final/<domain>` and
`end/<phase>/<domain>` (held-out loss at the plan's end and at each phase end), `gap|recovery|forgetting|
adaptation/<switch>/<domain>` (the stability metrics of each switch: `<switch>` is the phase that starts
there, or `<phase>.upsample` for an upsampling start), `release/<phase>/<domain>` (the eval of a branch
anneal's release checkpoint) and `tokens_per_s` (the median of the run's log rows).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import io
import itertools
import json
import math
import pathlib
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from clt import config, launch, report, status
from clt.config import ConfigError, MonitorConfig
from clt.metrics import write_atomic
from clt.monitor import eval_curves, eval_steps, stability
from clt.plan import Plan
from clt.plan_view import format_table, phase_bands, pyplot

SWEEP_FILE = "sweep.json"
METRIC_KINDS = ("final/<domain>", "end/<phase>/<domain>", "gap/<switch>/<domain>", "recovery/<switch>/<domain>",
                "forgetting/<switch>/<domain>", "adaptation/<switch>/<domain>", "release/<phase>/<domain>",
                "tokens_per_s")
DEFAULT_METRICS = ("final/*", "gap/*", "recovery/*", "forgetting/*", "adaptation/*", "tokens_per_s")
HIGHER_IS_BETTER = ("adaptation/*", "tokens_per_s")
"""Metrics whose best value is the largest (losses, gaps, recovery steps and forgetting: the smallest)."""
MAX_NAME = 200  # a run's name is a folder name: file systems allow 255 bytes
_WORD = re.compile(r"[A-Za-z0-9_.+-]+")  # what a label or a value may show in a run's name
_STATS = {"gap": "gap", "recovery": "recovery_steps", "forgetting": "forgetting", "adaptation": "adaptation"}


class SweepError(ValueError):
    """Bad sweep input found before anything ran: one line per problem (each a point and its field)."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


# ----------------------------------------------------------------------------------------------------------
# The sweep config.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One axis: the override `key`, its values, its label in run names and what each value is called there."""

    key: str = ""
    values: tuple[Any, ...] = ()
    label: str = ""
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZipGroup:
    """Axes that move together: point i of the group sets value i of each."""

    zip: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SweepFile:
    """A sweep config's fields as written (the axes are checked on their own, see `load_sweep`)."""

    base: str = ""
    overrides: tuple[str, ...] = ()
    axes: tuple[Any, ...] = ()
    seeds: tuple[int, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS
    name: str = ""
    scaled: tuple[str, ...] = ()
    """Keys counted in steps (budget.steps, monitor.every, ...) that the command line's `size=N` multiplies by N,
    so that one word makes the sweep larger on a larger machine and its intervals stay in proportion."""


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: `groups` are the grid's dimensions (a plain axis is a group of one, a zip group several);
    `overrides` are every run's (the sweep file's, then the command line's)."""

    path: str
    name: str
    base: str
    overrides: tuple[str, ...]
    groups: tuple[tuple[Axis, ...], ...]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]

    @property
    def labels(self) -> list[str]:
        return [a.label for g in self.groups for a in g]


@dataclass(frozen=True)
class Point:
    """One run of the grid: its name (a folder of the sweep's workdir), the name of its grid point (the same
    without the seed: what seeds are averaged over), its axis values as shown, and its own overrides."""

    name: str
    point: str
    values: tuple[tuple[str, str], ...]
    overrides: tuple[str, ...]
    seed: int | None


def value_text(v: Any) -> str | None:
    """A value as a run name shows it (None for a value with no short spelling: a dict, a tuple). Floats take
    the shorter of the plain and the scientific spelling: 0.25, 1e-3, 3e-4."""
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        plain = f"{v:.12g}"
        mantissa, exponent = f"{v:.12e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        sci = f"{mantissa}e{int(exponent)}"
        return plain if len(plain) <= len(sci) and "e" not in plain else sci
    if isinstance(v, str) and v:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", v)
    return None


def _axis(raw: Any, path: str) -> Axis:
    axis = config.build(Axis, raw, path)
    if not axis.key or "=" in axis.key:
        raise ConfigError(f"{path}.key", axis.key, "an axis needs the dotted key it overrides",
                          'write e.g. key="phases.shift.replay"')
    if axis.key == "seed":
        raise ConfigError(f"{path}.key", axis.key, "seeds are their own field", "write c.seeds = (0, 1, ...)")
    if not axis.values:
        raise ConfigError(f"{path}.values", axis.values, "an axis needs at least one value", "write values=(a, b)")
    label = axis.label or axis.key.rsplit(".", 1)[-1]
    if not _WORD.fullmatch(label):
        raise ConfigError(f"{path}.label", label, "a label is letters, digits and _.+- (it names folders)",
                          'write e.g. label="replay"')
    names = axis.names or tuple(value_text(v) for v in axis.values)
    if len(names) != len(axis.values):
        raise ConfigError(f"{path}.names", axis.names, f"{len(axis.values)} values but {len(names)} names",
                          "give one name per value")
    for i, (v, n) in enumerate(zip(axis.values, names)):
        if n is None:
            raise ConfigError(f"{path}.values.{i}", v, "has no short name for run folders",
                              "give the axis names=(...), one word per value")
        if not _WORD.fullmatch(n):
            raise ConfigError(f"{path}.names.{i}", n, "a name is letters, digits and _.+- (it names folders)",
                              "use e.g. names=('cos', 'wsd')")
    return dataclasses.replace(axis, label=label, names=tuple(names))


def _groups(raw_axes: tuple, path: str) -> tuple[tuple[Axis, ...], ...]:
    groups = []
    for i, raw in enumerate(raw_axes):
        where = f"{path}.{i}"
        if isinstance(raw, dict) and "zip" in raw:
            members = config.build(ZipGroup, raw, where).zip
            if not isinstance(members, tuple) or len(members) < 2:
                raise ConfigError(f"{where}.zip", members, "a zipped group holds two or more axes",
                                  "write zip=(dict(key=..., values=...), dict(key=..., values=...))")
            group = tuple(_axis(m, f"{where}.zip.{j}") for j, m in enumerate(members))
            lengths = [len(a.values) for a in group]
            if len(set(lengths)) > 1:
                raise ConfigError(f"{where}.zip", lengths, "zipped axes move together, so they need as many "
                                  "values each", "give every axis of the group the same number of values")
            groups.append(group)
        else:
            groups.append((_axis(raw, where),))
    labels = [a.label for g in groups for a in g]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(path, twice, "two axes have the same label", "give them distinct label=... values")
    return tuple(groups)


def load_sweep(path: str, overrides: Sequence[str] = ()) -> Sweep:
    """Read and check a sweep config file; `overrides` (from the command line) go to every run after the
    file's own. Raises ConfigError (one line) for a file that is not a sweep config."""
    try:
        raw = config.load_raw(path)
    except ConfigError as e:
        raise ConfigError("SWEEP_CONFIG", e.value, e.problem, e.fix.replace("configs/demo.py",
                                                                            "configs/sweeps/smoke_replay_peak.py"))
    axes = raw.pop("axes", ())
    spec = config.build(SweepFile, raw, "")
    if not spec.base:
        raise ConfigError("base", spec.base, "a sweep needs the experiment config it varies",
                          'write c.base = "configs/demo.py"')
    for i, o in enumerate((*spec.overrides, *overrides)):
        if "=" not in o:
            raise ConfigError(f"overrides.{i}" if i < len(spec.overrides) else "KEY=VALUE", o,
                              "an override is key=value", "write e.g. monitor.every=50")
    sizes = [o.split("=", 1)[1] for o in overrides if _key(o) == "size"]
    overrides = [o for o in overrides if _key(o) != "size"]
    if not isinstance(axes, tuple):
        raise ConfigError("axes", axes, "axes is a tuple of axes", 'write c.axes = (dict(key=..., values=(...)),)')
    groups = _groups(axes, "axes")
    if not groups and not spec.seeds:
        raise ConfigError("axes", (), "nothing to sweep", "give axes, seeds, or both")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError("seeds", spec.seeds, "a seed is listed twice", "list each seed once")
    if not spec.metrics:
        raise ConfigError("metrics", (), "no metrics to report", f"e.g. {DEFAULT_METRICS}")
    own = spec.overrides
    if sizes:  # a scaled key the command line or an axis sets itself keeps that value
        scaled = _scaled(spec, sizes[-1], {_key(o) for o in overrides} | {a.key for g in groups for a in g})
        own = tuple(o for o in own if _key(o) not in scaled) + tuple(f"{k}={v}" for k, v in scaled.items())
    return Sweep(path=str(path), name=spec.name or pathlib.Path(path).stem, base=spec.base,
                 overrides=(*own, *overrides), groups=groups, seeds=spec.seeds, metrics=spec.metrics)


_MISSING = object()


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _scaled(spec: SweepFile, size: str, set_elsewhere: set[str]) -> dict[str, int]:
    """What `size=N` sets: each of the sweep file's `scaled` keys but those in `set_elsewhere`, at N times its
    value in the base config after the file's overrides (whose own entry for the key it replaces)."""
    try:
        n = int(size)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError("size", size, "is a positive whole number (the sweep's scaled keys are multiplied by it)",
                          "write e.g. size=4")
    if not spec.scaled:
        raise ConfigError("size", size, "this sweep declares no scaled keys",
                          "add c.scaled = ('budget.steps', 'monitor.every', ...) to the sweep file, or override "
                          "the keys themselves")
    cfg, out = config.load(spec.base, spec.overrides), {}
    for key in spec.scaled:
        if key in set_elsewhere:
            continue
        value: Any = cfg
        for part in key.split("."):
            value = value if value is None else getattr(value, part, _MISSING)  # a group set to None stays None
        if not isinstance(value, int) or isinstance(value, bool):
            problem = ("names no field of the base config" if value is _MISSING else
                       f"is {value!r} in the base config, not a whole number")
            raise ConfigError("scaled", key, problem,
                              "list only keys counted in steps, e.g. budget.steps, monitor.every, log.every")
        out[key] = value * n
    return out


# ----------------------------------------------------------------------------------------------------------
# The grid: points, names, overrides, and every point checked before anything runs.
# ----------------------------------------------------------------------------------------------------------
def override(key: str, value: Any) -> str:
    """`key=value` in the command-line grammar (`config.parse_value` reads it back as the same value)."""
    return f"{key}={value!r}"


def expand(sweep: Sweep) -> list[Point]:
    """Every run of the grid, in order (the first axis slowest, seeds fastest); SweepError when two runs
    would share a name (a folder)."""
    points = []
    for combo in itertools.product(*(range(len(g[0].values)) for g in sweep.groups)):
        values = tuple((a.label, a.names[i]) for g, i in zip(sweep.groups, combo) for a in g)
        sets = tuple(override(a.key, a.values[i]) for g, i in zip(sweep.groups, combo) for a in g)
        point = ",".join(f"{label}={text}" for label, text in values)
        for seed in sweep.seeds or (None,):
            name = ",".join(filter(None, [point, None if seed is None else f"seed={seed}"]))
            points.append(Point(name=name, point=point, values=values, seed=seed,
                                overrides=sets + (() if seed is None else (override("seed", seed),))))
    problems = []
    by_name: dict[str, list[Point]] = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    for name, same in by_name.items():
        if len(same) > 1:
            problems.append(f"sweep point {name}: {len(same)} grid points have this name ("
                            + " / ".join(" ".join(p.overrides) for p in same) + "); give the axis distinct names=")
        elif len(name) > MAX_NAME:
            problems.append(f"sweep point {name[:40]}...: the name is {len(name)} characters, over {MAX_NAME} (a "
                            "folder name); give the axes shorter labels or names=")
    if problems:
        raise SweepError(problems)
    return points


def run_overrides(sweep: Sweep, point: Point) -> list[str]:
    """Everything one run of the sweep is given on top of the base config, in order: the sweep file's
    overrides, the command line's, then the point's axis values and seed. The one place that decides what a
    run is: sweep.json records it, `clt train` and the launchers receive it, and per-run settings a sink may
    want belong here: the W&B group is the sweep's name and the tags are the axis values (they stay unused
    while `log.wandb.project` is empty; the sweep file's own overrides may replace them)."""
    tags = tuple(f"{label}={text}" for label, text in point.values)
    tags += (f"seed={point.seed}",) if point.seed is not None else ()
    tracking = [f"log.wandb.group={sweep.name!r}", f"log.wandb.tags={tags!r}"]
    return [*tracking, *sweep.overrides, *point.overrides]


def run_config(sweep: Sweep, point: Point) -> config.Config:
    """The point's validated Config, through clt's own loader (as `clt train` builds it)."""
    return config.load(sweep.base, run_overrides(sweep, point))


def validate(sweep: Sweep, points: Sequence[Point], n_devices: int | None = None) -> dict[str, tuple]:
    """Build every point's Config and check its plan (`clt plan show --devices N`'s checks; with None, those
    that need no device count), and the metric patterns against what the plans have. Returns {run name:
    (config, plan)}; raises SweepError with one line per bad point and per bad pattern."""
    from clt import step  # imports jax (no backend is started): `clt sweep report` needs none of it

    if not pathlib.Path(sweep.base).is_file():
        raise ConfigError("base", sweep.base, "no such file", "give the experiment config's path from the current "
                          "folder, e.g. configs/smoke.py")
    problems, built = [], {}
    for p in points:
        try:
            cfg = run_config(sweep, p)
            built[p.name] = (cfg, step.checked_plan(cfg, n_devices))
        except ConfigError as e:
            problems.append(f"sweep point {p.name}: {e}")
    if built:
        known: dict[str, None] = {}
        for cfg, plan in built.values():
            known.update(dict.fromkeys(metric_names(plan, cfg.monitor)))
        for i, pattern in enumerate(sweep.metrics):
            if not any(fnmatch.fnmatchcase(m, pattern) for m in known):
                examples = {m.split("/")[0]: m for m in reversed(known)}  # the first metric of each kind
                problems.append(f"metrics.{i} = {pattern!r}: names no metric of this sweep; metrics are "
                                f"{', '.join(METRIC_KINDS)}; here e.g. {', '.join(reversed(examples.values()))}")
    if problems:
        raise SweepError(problems)
    return built


# ----------------------------------------------------------------------------------------------------------
# Metrics of one run, from its files (the monitor's definitions; nothing is recomputed differently here).
# ----------------------------------------------------------------------------------------------------------
def switch_name(entry: dict) -> str:
    """A switch in metric names: the phase starting there, or `<phase>.upsample` for an upsampling start (step
    numbers would not line up across points whose phases differ in length)."""
    return f"{entry['phase']}.upsample" if entry["kind"] == "upsample" else entry["phase"]


def run_metrics(plan: Plan, monitor: MonitorConfig, rows: Sequence[dict]) -> dict[str, float]:
    """Every metric of METRIC_KINDS that a run's metrics rows hold so far, in table order."""
    curves = eval_curves(rows, plan.domains)
    out: dict[str, float] = {}
    for d in plan.domains:
        if plan.total_steps in curves[d]:
            out[f"final/{d}"] = curves[d][plan.total_steps]
    for p in plan.phases:
        for d in plan.domains:
            if p.end in curves[d]:
                out[f"end/{p.name}/{d}"] = curves[d][p.end]
    entries = stability(plan, rows, monitor)
    for kind, key in _STATS.items():
        for e in entries:
            if e.get(key) is not None:
                out[f"{kind}/{switch_name(e)}/{e['domain']}"] = float(e[key])
    for r in rows:
        for d in plan.domains:
            v = r.get(f"release/eval/{d}/loss")
            if isinstance(v, (int, float)):
                out[f"release/{r['phase']}/{d}"] = float(v)
    rates = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))
             and not any(k.startswith("eval/") for k in r)]
    if rates:
        out["tokens_per_s"] = float(statistics.median(rates))
    return out


def metric_names(plan: Plan, monitor: MonitorConfig) -> list[str]:
    """The metrics a finished run of `plan` has, in table order: `run_metrics` of the rows such a run writes
    (an eval at every eval step, a log row, a release eval at the end of each branch anneal)."""
    rows = [dict(step=s, **{f"eval/{d}/loss": 0.0 for d in plan.domains}) for s in eval_steps(plan, monitor)]
    rows.append(dict(step=0, loss=0.0, tokens_per_s=1.0))
    rows += [dict(step=p.end, phase=p.name, **{f"release/eval/{d}/loss": 0.0 for d in plan.domains})
             for p in plan.phases if p.schedule.kind == "infinite" and p.schedule.branch]
    return list(run_metrics(plan, monitor, rows))


# ----------------------------------------------------------------------------------------------------------
# Running the grid.
# ----------------------------------------------------------------------------------------------------------
def _remote(path: str) -> bool:
    """A bucket (gs://, s3://): read and written through clt.data.store, which imports tensorstore (slow to
    import, so only for such paths)."""
    return "://" in str(path)


def run_dir(workdir: str, point: Point) -> str:
    return f"{workdir.rstrip('/')}/{point.name}" if _remote(workdir) else str(pathlib.Path(workdir) / point.name)


def _launch_record(folder: str) -> dict:
    if _remote(folder):
        from clt.data import store
        return store.read_json(store.join(folder, "launch"), "launch.json") or {}
    path = pathlib.Path(folder) / "launch" / "launch.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(folder: str) -> str:
    """pending (never started), submitted (a job was submitted and has not finished), or what `clt status`
    says: running, finished, stopped, preempted, interrupted. A run in a bucket is finished or not by its
    events.jsonl alone."""
    if _remote(folder):
        from clt.data import store
        lines = (store.read_bytes(folder, "events.jsonl") or b"").decode().splitlines()
        events = [json.loads(line) for line in lines if line.strip().endswith("}")]
        state = ("finished" if any(e.get("event") == "finished" for e in events) else
                 "interrupted" if events else "pending")
    elif not (pathlib.Path(folder) / "plan.json").is_file():
        state = "pending"
    else:
        state = status.read_status(folder)["state"]
    if state in ("pending", "interrupted", "preempted") and _launch_record(folder).get("submitted"):
        return "submitted"
    return state


SKIP_STATES = {"finished": "finished before", "stopped": "stopped itself before (rerun it with clt train to retry)",
               "running": "running in another process", "submitted": "submitted as a job before"}
"""States in which a run is not started again, and why (the progress line says it)."""


def write_manifest(workdir: str, sweep: Sweep, points: Sequence[Point]) -> None:
    """DIR/sweep.json: the expanded grid (each run's name, point, axis values, seed and full overrides), so
    the report needs nothing but the folder."""
    axes = [dict(label=a.label, key=a.key, names=list(a.names), group=i) for i, g in enumerate(sweep.groups)
            for a in g]
    runs = [dict(name=p.name, point=p.point, axes=dict(p.values), seed=p.seed, overrides=run_overrides(sweep, p))
            for p in points]
    record = dict(sweep=sweep.path, name=sweep.name, base=sweep.base, overrides=list(sweep.overrides), axes=axes,
                  seeds=list(sweep.seeds), metrics=list(sweep.metrics), runs=runs)
    text = json.dumps(record, indent=1) + "\n"
    if _remote(workdir):
        from clt.data import store
        store.write_bytes(workdir, SWEEP_FILE, text.encode())
    else:
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
        write_atomic(pathlib.Path(workdir) / SWEEP_FILE, text)


def train_here(base: str, folder: str, overrides: Sequence[str], quiet: bool) -> int:
    """`clt train` of one run as a child process on this machine; returns its exit code. SIGINT and SIGTERM
    reach the child once, through this process (the child has its own process group, so a Ctrl-C in the
    terminal is not delivered twice, which `clt train` would take as "stop now, without a save")."""
    argv = [sys.executable, "-m", "clt.cli", "train", base, "--workdir", folder, *overrides]
    child = subprocess.Popen(argv + (["--quiet"] if quiet else []), stdin=subprocess.DEVNULL, process_group=0)
    forward = lambda signum, frame: child.poll() is None and child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def job_name(sweep: Sweep, point: Point) -> str:
    """A slurm/gke job's name: the sweep's, and a hash of the run's name (unique and stable; a DNS label)."""
    digest = hashlib.sha1(point.name.encode()).hexdigest()[:8]
    return f"{launch.default_name(sweep.name)[:31].rstrip('-')}-{digest}"


def run_one(sweep: Sweep, point: Point, folder: str, where: str | None, job: dict, dry_run: bool,
            quiet: bool) -> int:
    """Train, or submit, one run; returns the exit code of its `clt train` (0 for a submitted job)."""
    overrides = run_overrides(sweep, point)
    if where is None:
        return train_here(sweep.base, folder, overrides, quiet)
    if where == "local":
        return launch.launch_local(sweep.base, folder, overrides, job["processes"], quiet=quiet)
    return launch.launch_job(where, sweep.base, folder, overrides, name=job_name(sweep, point), dry_run=dry_run,
                             echo=False, **{k: v for k, v in job.items() if k != "processes"})


def select(points: Sequence[Point], only: str | None) -> list[Point]:
    """The runs whose name matches `--only` (an fnmatch glob); all without it."""
    if only is None:
        return list(points)
    chosen = [p for p in points if fnmatch.fnmatchcase(p.name, only)]
    if not chosen:
        raise ConfigError("--only", only, "matches no run of the sweep",
                          f"runs are named like {points[0].name!r} (see --dry-run)")
    return chosen


def describe(sweep: Sweep, points: Sequence[Point], workdir: str) -> str:
    """The head line of `clt sweep`: what is swept, over how many runs, where."""
    shape = " x ".join(("(" + ", ".join(a.label for a in g) + ")" if len(g) > 1 else g[0].label)
                       + f" {len(g[0].values)}" for g in sweep.groups)
    seeds = f"{len(sweep.seeds)} seed{'s' if len(sweep.seeds) != 1 else ''}" if sweep.seeds else "the base seed"
    return (f"sweep {sweep.name}: {len(points)} runs ({shape or 'no axes'}; {seeds}) of {sweep.base} "
            f"in {workdir}")


def dry_run_table(sweep: Sweep, points: Sequence[Point], workdir: str) -> str:
    """What `--dry-run` prints: the head line, the overrides of every run, and a row per run."""
    lines = [describe(sweep, points, workdir)]
    if sweep.overrides:
        lines.append("every run: " + " ".join(sweep.overrides))
    rows = [{"run": p.name, "state": run_state(run_dir(workdir, p)), "overrides": " ".join(p.overrides)}
            for p in points]
    return "\n".join(lines + [format_table(rows)])


def run_sweep(sweep: Sweep, points: Sequence[Point], workdir: str, *, where: str | None = None,
              job: dict | None = None, dry_run: bool = False, quiet: bool = False,
              echo: Callable[[str], None] | None = None) -> int:
    """Run (or submit) `points` one after another, skipping finished ones; returns 0 when every one finished
    (or was submitted), 1 when one failed or stopped. A preempted run (SIGTERM or Ctrl-C reached it; it saved)
    stops the sweep: rerunning the same command resumes it."""
    job = job or {}
    echo = echo or (lambda line: print(line, flush=True))  # before the child's own output
    if not dry_run:
        write_manifest(workdir, sweep, expand(sweep))  # the whole grid, also when --only runs a part of it
    done, skipped, failed = 0, 0, []
    for i, p in enumerate(points, 1):
        folder = run_dir(workdir, p)
        state = run_state(folder)
        if state in SKIP_STATES:
            skipped += 1
            echo(f"sweep {i}/{len(points)}: {p.name}: {SKIP_STATES[state]}, skipped")
            continue
        resume = " (resuming)" if state in ("interrupted", "preempted") else ""
        echo(f"sweep {i}/{len(points)}: {p.name}{resume} ({done} done, {skipped} skipped"
             + (f", {len(failed)} failed)" if failed else ")"))
        code = run_one(sweep, p, folder, where, job, dry_run, quiet)
        after = "finished" if where in ("slurm", "gke") and code == 0 else run_state(folder)
        if after == "finished":
            done += 1
        elif after == "preempted":
            echo(f"sweep stopped: {p.name} was preempted and saved; rerun the same command to resume the sweep")
            return 0
        else:
            failed.append(f"{p.name} ({after}, exit {code})")
    verb = ("rendered (dry run)" if dry_run else "submitted") if where in ("slurm", "gke") else "done"
    echo(f"sweep {sweep.name}: {len(points)} runs: {done} {verb}, {skipped} skipped"
         + (f", {len(failed)} failed: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------
# The report: results.csv / results.md / runs.csv and plots, from DIR/sweep.json and the runs' files.
# ----------------------------------------------------------------------------------------------------------
def read_manifest(workdir: str | pathlib.Path) -> dict:
    path = pathlib.Path(workdir) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError("DIR", str(workdir), "has no sweep.json (not a sweep's folder, or the sweep never started)",
                          "give the --workdir of a `clt sweep`")
    return json.loads(path.read_text())


def higher_is_better(metric: str) -> bool:
    return any(fnmatch.fnmatchcase(metric, p) for p in HIGHER_IS_BETTER)


def aggregate(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) over seeds; no spread from one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class SweepResults:
    """A sweep's folder read once: its manifest, each run's state and metrics, the report's columns, and per
    grid point the (mean, spread) of each metric and the metrics it is best at."""

    manifest: dict
    runs: dict[str, report.Run]  # started runs, by name
    states: dict[str, str]
    metrics: dict[str, dict[str, float]]  # run name -> metric -> value
    columns: list[str]
    points: dict[str, list[dict]]  # grid point -> its runs' manifest entries
    stats: dict[str, dict[str, tuple[float, float | None]]]  # point -> metric -> (mean, std)
    best: dict[str, list[str]]  # point -> metrics it is best at


def read_results(workdir: str | pathlib.Path) -> SweepResults:
    """Everything the report shows, from the folder alone (a run not started yet has no values)."""
    manifest = read_manifest(workdir)
    runs, states, metrics, known = {}, {}, {}, {}
    for entry in manifest["runs"]:
        folder = pathlib.Path(workdir) / entry["name"]
        states[entry["name"]] = run_state(str(folder))
        if (folder / "plan.json").is_file():
            run = runs[entry["name"]] = report.load_run(folder)
            metrics[entry["name"]] = run_metrics(run.plan, run.monitor, run.rows)
            known.update(dict.fromkeys(metric_names(run.plan, run.monitor)))
    columns = list(dict.fromkeys(m for pattern in manifest["metrics"] for m in known
                                 if fnmatch.fnmatchcase(m, pattern)))
    points: dict[str, list[dict]] = {}
    for entry in manifest["runs"]:
        points.setdefault(entry["point"], []).append(entry)
    stats = {pt: {m: aggregate(vals) for m in columns
                  if (vals := [metrics[e["name"]][m] for e in entries if m in metrics.get(e["name"], {})])}
             for pt, entries in points.items()}
    best: dict[str, list[str]] = {pt: [] for pt in points}
    for m in columns:
        means = {pt: s[m][0] for pt, s in stats.items() if m in s and math.isfinite(s[m][0])}
        if means:
            top = (max if higher_is_better(m) else min)(means.values())
            for pt, v in means.items():
                if math.isclose(v, top, rel_tol=1e-12, abs_tol=1e-12):
                    best[pt].append(m)
    return SweepResults(manifest, runs, states, metrics, columns, points, stats, best)


def _cell(stat: tuple[float, float | None] | None, bold: bool) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    digits = 0 if abs(mean) >= 1000 else 3
    text = f"{mean:.{digits}f}"
    text = f"**{text}**" if bold else text
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def results_rows(res: SweepResults, markdown: bool) -> list[dict]:
    """One row per grid point: its axis values, runs finished, and each metric's mean (± spread), the best
    bold (markdown); for the CSV, numbers at full precision with `<metric> std` columns and a `best` column."""
    rows = []
    for pt, entries in res.points.items():
        # the axis columns name a point in the tables people read; the CSV keeps its name as a key
        row: dict[str, Any] = {"point": pt} if not markdown or not entries[0]["axes"] else {}
        row.update(entries[0]["axes"])
        finished = sum(res.states[e["name"]] == "finished" for e in entries)
        if markdown:
            row["finished"] = f"{finished}/{len(entries)}"
            row.update({m: _cell(res.stats[pt].get(m), m in res.best[pt]) for m in res.columns})
        else:
            row.update(runs=len(entries), finished=finished)
            for m in res.columns:
                mean, std = res.stats[pt].get(m, (None, None))
                row.update({m: "" if mean is None else repr(mean), f"{m} std": "" if std is None else repr(std)})
            row["best"] = ";".join(res.best[pt])
        rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _save(fig, path: pathlib.Path) -> None:
    """Write and close a figure (one place, so tests can look at a figure instead)."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_metrics_against(res: SweepResults, axis: dict, path: pathlib.Path) -> None:
    """Every reported metric against one axis: a panel per metric, the axis's values along x, a line per
    combination of the other axes' values; dots are the seeds' values, the line their mean, bars the spread."""
    plt = pyplot()
    others = [a["label"] for a in res.manifest["axes"] if a["group"] != axis["group"]]
    lines: dict[str, dict[int, list[str]]] = {}  # other axes' values -> x -> grid points
    for pt, entries in res.points.items():
        values = entries[0]["axes"]
        key = ",".join(f"{o}={values[o]}" for o in others) or res.manifest["name"]
        lines.setdefault(key, {}).setdefault(axis["names"].index(values[axis["label"]]), []).append(pt)
    n = len(res.columns)
    cols = min(n, 3)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4.4 * cols, 3.2 * -(-n // cols) + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, res.columns):
        for k, (label, by_x) in enumerate(lines.items()):
            xs, means, stds = [], [], []
            for x, pts in sorted(by_x.items()):
                for pt in pts:
                    seeds = [res.metrics[e["name"]][m] for e in res.points[pt] if m in res.metrics.get(e["name"], {})]
                    ax.plot([x] * len(seeds), seeds, ls="none", marker=".", ms=4, color=f"C{k}", alpha=0.45)
                    if m in res.stats[pt]:
                        xs.append(x)
                        means.append(res.stats[pt][m][0])
                        stds.append(res.stats[pt][m][1] or 0.0)
            if xs:
                ax.errorbar(xs, means, yerr=stds, color=f"C{k}", marker="o", ms=4, lw=1.3, capsize=3, label=label)
        ax.set_title(m + ("  (higher is better)" if higher_is_better(m) else ""), fontsize=9)
        ax.set_xticks(range(len(axis["names"])), axis["names"])
        ax.set_xlim(-0.35, len(axis["names"]) - 0.65)
        ax.set_xlabel(f"{axis['label']} ({axis['key']})", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if others and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{res.manifest['name']}: metrics against {axis['label']} (mean ± std over seeds, dots: runs)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if others else 0, 1, 1))
    _save(fig, path)


def plot_eval_curves(res: SweepResults, domain: str, path: pathlib.Path) -> None:
    """One domain's held-out loss over steps for every run, coloured by grid point (its seeds share the
    colour), on the phase bands of the first run's plan."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.6))
    first = next(iter(res.runs.values()))
    phase_bands(ax, first.plan)
    colours = plt.get_cmap("tab10" if len(res.points) <= 10 else "viridis")
    values = []
    for k, (pt, entries) in enumerate(res.points.items()):
        colour = colours(k % 10 if len(res.points) <= 10 else k / max(len(res.points) - 1, 1))
        label = pt
        for e in entries:
            run = res.runs.get(e["name"])
            curve = eval_curves(run.rows, run.plan.domains).get(domain, {}) if run else {}
            if curve:
                t = sorted(curve)
                ax.plot(t, [curve[s] for s in t], color=colour, lw=1.2, alpha=0.85, label=label)
                values += list(curve.values())
                label = None  # one legend entry per grid point
    report.loss_ylim(ax, values)
    ax.set_xlim(0, max(r.plan.total_steps for r in res.runs.values()))
    ax.set_xlabel("step (updates applied)")
    ax.set_ylabel(f"{domain} held-out loss (nats/token)")
    same = all([p.end for p in r.plan.phases] == [p.end for p in first.plan.phases] for r in res.runs.values())
    ax.set_title(f"{res.manifest['name']}: {domain} eval loss of every run"
                 + ("" if same else f" (phase bands of {first.workdir.name})"), pad=16)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_sweep_report(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None,
                       res: SweepResults | None = None) -> pathlib.Path:
    """Render `DIR/report/` (or `out`): results.csv and results.md (a row per grid point), runs.csv (a row per
    run), and the plots; returns the path of results.md. Works mid-sweep: runs not started have no values."""
    res = res or read_results(workdir)
    folder = pathlib.Path(out) if out is not None else pathlib.Path(workdir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text(_csv(results_rows(res, markdown=False)))
    per_run = [{"run": e["name"], "point": e["point"], "seed": e["seed"], "state": res.states[e["name"]],
                **{m: repr(res.metrics[e["name"]][m]) if m in res.metrics.get(e["name"], {}) else ""
                   for m in res.columns}} for e in res.manifest["runs"]]
    (folder / "runs.csv").write_text(_csv(per_run))
    plots = []
    if res.runs and res.columns:
        for axis in res.manifest["axes"]:
            plots.append((f"metrics against {axis['label']}", f"metrics_vs_{axis['label']}.png"))
            plot_metrics_against(res, axis, folder / plots[-1][1])
    domains = list(dict.fromkeys(d for r in res.runs.values() for d in r.plan.domains))
    for d in domains if res.runs else []:
        plots.append((f"{d} eval loss of every run", f"eval_{d}.png"))
        plot_eval_curves(res, d, folder / plots[-1][1])
    finished = sum(s == "finished" for s in res.states.values())
    m = res.manifest
    md = [f"# Sweep report: {m['name']}", "",
          f"`{m['sweep']}` over `{m['base']}`: {len(res.points)} grid points x {max(len(m['seeds']), 1)} "
          f"seed(s), {finished}/{len(res.states)} runs finished.", "",
          "Each cell is the mean over the point's seeds ± their standard deviation (n-1); **bold** is the best "
          "point of each metric (the lowest, except adaptation and tokens/s: the highest). Losses in nats per "
          "token; recovery in steps. Per-run values: `runs.csv`; full precision: `results.csv`.", ""]
    md += [format_table(results_rows(res, markdown=True), markdown=True), ""]
    md += [f"![{what}]({file})\n" for what, file in plots]
    path = folder / "results.md"
    path.write_text("\n".join(md))
    return path


def summary_table(res: SweepResults, max_width: int = 120) -> str:
    """The results table as text (what `clt sweep report` prints after the path)."""
    return format_table(results_rows(res, markdown=True), max_width=max_width)
