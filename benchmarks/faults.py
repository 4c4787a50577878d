"""Random SIGKILLs against `clt train`: does every killed and resumed run end as the uninterrupted run?

    python benchmarks/faults.py N [--seed S] [--workdir-root DIR] [--max-kills K] [--out FILE.json]

Runs `clt train configs/smoke.py` (28 steps, 3 phases, checkpoints at 8, 12, 16, 22, 24, 28) as a subprocess,
exactly as a user types it, on one small prepared demo data set shared by every run. First one uninterrupted
reference run (which also fills a compilation cache the trials share), then a second uninterrupted run that
gives the run's wall time T and checks that two clean runs agree. Each of the N trials then:
  - draws from a seeded generator (seed S, trial i) 1..K kills; for each kill it starts the command and sends
    SIGKILL after a delay uniform in [0, T) of wall time from the process start, so kills land anywhere: in
    interpreter and JAX start-up, while taking the lock or rewriting the run files, in compilation, between
    steps, in evals, while an async checkpoint save is in flight, after the final save (a process that ends
    before its kill is left alone, and the trial stops killing);
  - resumes with the same command until it exits 0 (at most 3 times);
  - compares with the reference: the final train state (params and optimizer, byte for byte) and every logged
    loss (train and eval) -- "diverged" when either differs or the run could not be finished -- and the run
    files: metrics.jsonl rows and events.jsonl events, apart from timing fields and the run's own history
    events (resume, preempted, stopped, quarantine, config_change) -- "run files not identical" when they
    differ (a duplicated, missing or changed row or event). Leftover temporary files are reported too.
Each trial prints one line; the last line is `N trials, K diverged, M with run files not identical`.
A JSON result (command, machine, per-trial kills and outcomes) goes to benchmarks/results/faults-<date>.json.
Simulated devices: the runs use XLA_FLAGS from the environment, or 8 simulated CPU devices (as the tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from clt import checkpoint, config  # noqa: E402
from clt.metrics import TIMING_FIELDS, read_jsonl  # noqa: E402
from clt.resume import HISTORY_EVENTS  # noqa: E402

from step import command_line, machine_info, stamp, write_result  # noqa: E402  benchmarks/step.py

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = "configs/smoke.py"
TIMING = TIMING_FIELDS | {"time"}  # clock readings: metrics fields, and the time spent by kind in end events
MAX_RESUMES = 3


# ----------------------------------------------------------------------------------------------------------
# Running clt.
# ----------------------------------------------------------------------------------------------------------
def prepare_data(root: pathlib.Path) -> pathlib.Path:
    """The demo domains, small (as the tests prepare them), once per workdir root."""
    data = root / "data"
    if not (data / "code").exists():
        from clt.data.prepare import prepare_demo

        prepare_demo(str(data), progress=False, max_bytes=150_000)
    return data


class Runner:
    """`clt train configs/smoke.py --workdir WD` with the data override, in subprocesses sharing one cache."""

    def __init__(self, root: pathlib.Path, data: pathlib.Path):
        domains = {"prose": str(data / "prose"), "code": str(data / "code")}
        self.overrides = [f"data.domains={domains!r}"]
        path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env = dict(os.environ, PYTHONPATH=path,
                        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def command(self, wd: pathlib.Path) -> list[str]:
        return [sys.executable, "-m", "clt.cli", "train", CONFIG, "--workdir", str(wd), "--quiet", *self.overrides]

    def start(self, wd: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
        with open(log, "a") as f:
            return subprocess.Popen(self.command(wd), cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)

    def run(self, wd: pathlib.Path, log: pathlib.Path) -> tuple[int, float]:
        t0 = time.perf_counter()
        rc = self.start(wd, log).wait()
        return rc, time.perf_counter() - t0


def save_in_flight(folder: pathlib.Path, started: float) -> bool:
    """An Orbax temporary folder made by this process (an earlier kill's leftover is removed at start)."""
    for tmp in folder.glob("*.orbax-checkpoint-tmp*"):
        try:
            if tmp.stat().st_mtime >= started:
                return True
        except FileNotFoundError:  # renamed into place or removed meanwhile
            pass
    return False


def landing(wd: pathlib.Path, started: float) -> str:
    """Where a kill landed, from what the workdir shows at that moment."""
    metrics = wd / "metrics.jsonl"
    if not metrics.exists() or metrics.stat().st_mtime < started:
        where = "start-up"
    else:
        rows = read_jsonl(metrics)
        where = f"step {rows[-1]['step']}" if rows else "run files rewritten"
    if save_in_flight(wd / "checkpoints", started):
        where += ", save in flight"
    if any(e.get("event") == "finished" for e in read_jsonl(wd / "events.jsonl")):
        where = "after finishing"
    return where


# ----------------------------------------------------------------------------------------------------------
# Comparing with the reference.
# ----------------------------------------------------------------------------------------------------------
def run_files(wd: pathlib.Path) -> tuple[list[dict], list[dict]]:
    metrics = [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(wd / "metrics.jsonl")]
    events = [{k: v for k, v in e.items() if k not in TIMING} for e in read_jsonl(wd / "events.jsonl")
              if e.get("event") not in HISTORY_EVENTS]
    return metrics, events


def losses(wd: pathlib.Path) -> dict[tuple, float]:
    """Every logged loss by (step, key): train losses and eval losses."""
    return {(r["step"], k): v for r in read_jsonl(wd / "metrics.jsonl") for k, v in r.items()
            if k == "loss" or (k.startswith("eval/") and k.endswith("/loss"))}


def final_state(wd: pathlib.Path, step: int) -> list[np.ndarray] | None:
    store = checkpoint.CheckpointStore(wd / "checkpoints", config.CheckpointConfig(), read_only=True)
    try:
        if step not in store.steps():
            return None
        state = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return [np.asarray(x) for x in jax.tree.leaves(state)]
    finally:
        store.close()


def checkpoints_kept(wd: pathlib.Path) -> list[str]:
    """The folders of checkpoints/ (quarantine aside): what the keep policy left, and anything half-deleted."""
    folder = wd / "checkpoints"
    names = [p.name for p in folder.iterdir() if p.name != checkpoint.QUARANTINE] if folder.is_dir() else []
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


class Reference:
    def __init__(self, wd: pathlib.Path, total: int):
        self.total = total
        self.files = run_files(wd)
        self.checkpoints = checkpoints_kept(wd)
        self.losses = losses(wd)
        self.state = final_state(wd, total)

    def compare(self, wd: pathlib.Path) -> dict[str, Any]:
        """params/losses/files: whether each matches the reference; what differs first; leftovers."""
        out: dict[str, Any] = {}
        state = final_state(wd, self.total)
        out["params_ok"] = state is not None and len(state) == len(self.state) and all(
            a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(state, self.state))
        got = losses(wd)
        out["losses_ok"] = got == self.losses
        if not out["losses_ok"]:
            diff = sorted(k for k in got.keys() | self.losses.keys() if got.get(k) != self.losses.get(k))
            out["first_loss_diff"] = [list(diff[0]), self.losses.get(diff[0]), got.get(diff[0])]
        metrics, events = run_files(wd)
        out["files_ok"] = (metrics, events) == self.files
        if not out["files_ok"]:
            for name, a, b in (("metrics", self.files[0], metrics), ("events", self.files[1], events)):
                if a != b:
                    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    out["first_file_diff"] = dict(file=name, index=i, reference=a[i] if i < len(a) else None,
                                                  run=b[i] if i < len(b) else None, rows=[len(a), len(b)])
                    break
        out["checkpoints_ok"] = checkpoints_kept(wd) == self.checkpoints
        if not out["checkpoints_ok"]:
            out["checkpoints"] = dict(run=checkpoints_kept(wd), reference=self.checkpoints)
        quarantine = wd / "checkpoints" / checkpoint.QUARANTINE
        out["quarantined"] = sorted(p.name for p in quarantine.iterdir()) if quarantine.is_dir() else []
        out["leftovers"] = sorted(str(p.relative_to(wd)) for p in [*wd.rglob("*.orbax-checkpoint-tmp*"),
                                                                   *wd.rglob("*.tmp")])
        return out


# ----------------------------------------------------------------------------------------------------------
# Trials.
# ----------------------------------------------------------------------------------------------------------
def trial(i: int, seed: int, runner: Runner, ref: Reference, wall: float, max_kills: int,
          root: pathlib.Path) -> dict[str, Any]:
    rng = random.Random(seed * 1_000_003 + i)
    wd, log = root / f"trial-{i:03d}", root / f"trial-{i:03d}.log"
    shutil.rmtree(wd, ignore_errors=True)
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    kills, rc = [], None  # rc: the exit status of a process that ended before its kill
    for _ in range(rng.randint(1, max_kills)):
        delay = rng.uniform(0.0, wall)
        started = time.time()
        proc = runner.start(wd, log)
        try:
            rc = proc.wait(timeout=delay)
            kills.append(dict(delay_s=round(delay, 2), landed=f"not killed: ended first (rc {rc})"))
            break
        except subprocess.TimeoutExpired:
            where = landing(wd, started)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(dict(delay_s=round(delay, 2), landed=where))
    resumes, error = 0, None
    if rc != 0:  # killed (None) or failed: the same command until it finishes
        for resumes in range(1, MAX_RESUMES + 1):
            rc, _ = runner.run(wd, log)
            if rc == 0:
                break
        if rc != 0:
            error = f"resume exited {rc}; see {log}"
    result = dict(trial=i, kills=kills, resumes=resumes, error=error, **ref.compare(wd))
    result["diverged"] = bool(error) or not (result["params_ok"] and result["losses_ok"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def describe(r: dict[str, Any], n: int) -> str:
    kills = "; ".join(f"{k['delay_s']:.1f}s {k['landed']}" for k in r["kills"])
    verdict = ", ".join([f"params {'ok' if r['params_ok'] else 'DIFFER'}",
                         f"losses {'ok' if r['losses_ok'] else 'DIFFER'}",
                         f"run files {'identical' if r['files_ok'] else 'NOT IDENTICAL'}"])
    line = f"trial {r['trial'] + 1}/{n}: {len(r['kills'])} kill(s) [{kills}] -> {r['resumes']} resume(s); {verdict}"
    if r["leftovers"]:
        line += f"; leftovers {r['leftovers']}"
    if not r["checkpoints_ok"]:
        line += f"; checkpoints kept {r['checkpoints']['run']} (reference {r['checkpoints']['reference']})"
    if r["quarantined"]:
        line += f"; quarantined {r['quarantined']}"
    if r["error"]:
        line += f"; ERROR {r['error']}"
    if not r["files_ok"]:
        line += f"; first difference {json.dumps(r['first_file_diff'])[:600]}"
    if not r["losses_ok"]:
        line += f"; first loss difference {r['first_loss_diff']}"
    return line + f" ({r['seconds']}s)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("n", type=int, help="number of trials")
    p.add_argument("--seed", type=int, default=0, help="seeds every trial's kill count and delays")
    p.add_argument("--workdir-root", help="where data, runs and logs go (default: a temporary folder, deleted after)")
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial are drawn from 1..K")
    p.add_argument("--out", help="result JSON (default benchmarks/results/faults-<date>.json)")
    args = p.parse_args(argv)
    if args.n < 1 or args.max_kills < 1:
        sys.exit("faults.py: N and --max-kills must be >= 1")

    logging.getLogger("absl").setLevel(logging.ERROR)  # read-only stores (the comparisons) warn about it
    machine = machine_info()
    root = pathlib.Path(args.workdir_root or tempfile.mkdtemp(prefix="clt-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        runner = Runner(root, prepare_data(root))
        for name in ("reference", "repeat"):
            shutil.rmtree(root / name, ignore_errors=True)
            rc, seconds = runner.run(root / name, root / f"{name}.log")
            if rc != 0:
                sys.exit(f"faults.py: the uninterrupted {name} run failed (rc {rc}); see {root / name}.log")
            print(f"{name} run: {seconds:.1f}s", flush=True)
        wall = seconds  # the repeat ran with a warm compilation cache, as the trials do
        total = max(r["step"] for r in read_jsonl(root / "reference" / "metrics.jsonl"))
        ref = Reference(root / "reference", total)
        repeat = ref.compare(root / "repeat")
        if not (repeat["params_ok"] and repeat["losses_ok"] and repeat["files_ok"]):
            sys.exit(f"faults.py: two uninterrupted runs differ ({repeat}); comparisons would mean nothing")
        results = []
        for i in range(args.n):
            results.append(trial(i, args.seed, runner, ref, wall, args.max_kills, root))
            print(describe(results[-1], args.n), flush=True)
    finally:
        if not args.workdir_root:
            shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())
    diverged = sum(r["diverged"] for r in results)
    not_identical = sum(not r["files_ok"] for r in results)
    kills = [k for r in results for k in r["kills"]]
    summary = f"{args.n} trials, {diverged} diverged, {not_identical} with run files not identical"
    result = dict(benchmark="faults", command=command_line(), machine=machine,
                  config=dict(n=args.n, seed=args.seed, max_kills=args.max_kills, config=CONFIG, steps=total,
                              uninterrupted_wall_s=round(wall, 2), workdir_root=str(root)),
                  kills=len(kills), kills_landed=sum(not k["landed"].startswith("not killed") for k in kills),
                  leftovers=sum(bool(r["leftovers"]) for r in results),
                  other_checkpoints_kept=sum(not r["checkpoints_ok"] for r in results),
                  quarantined=sum(bool(r["quarantined"]) for r in results), summary=summary, trials=results)
    path = write_result(result, args.out, f"faults-{stamp()}.json")
    print(f"wrote {path}")
    print(summary)


if __name__ == "__main__":
    main()
