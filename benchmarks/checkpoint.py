"""How long the train loop blocks per checkpoint save, synchronous versus async (Orbax), for real train states.

    python benchmarks/checkpoint.py [--preset demo [125m ...]] [--saves 5] [--steps-between 2] [--batch 4]
        [--seq-len 64] [--modes sync async] [--dir DIR] [--out FILE.json]

For each preset the train state (params, AdamW moments, step) is built and sharded as `clt train` builds it
(`step.build`). For each mode a fresh `clt.checkpoint.CheckpointStore` saves the state `--saves` times, with
`--steps-between` donated train steps between saves, so that every save writes new device buffers, as in
the loop. Per save it records
  - blocking: the wall time `store.save(...)` takes to return, i.e. what the step loop loses per save;
  - done: the time from calling save until `store.wait()` returns (wait is called at once, so this is the
    whole cost of writing the checkpoint; for sync saves it equals blocking).
The first save of a mode is reported apart from the median of the later ones: the first async save starts
Orbax's background machinery and is known to be slower. Sync runs first unless --modes says otherwise, so
process-wide warm-up (tensorstore, thread pools) is paid by the first mode; swap --modes to check.
Checkpoints go to a temporary folder on the local disk (or --dir) and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

import jax

from clt import sharding
from clt.checkpoint import CheckpointStore
from clt.config import CheckpointConfig, ConfigError
from clt.model import PRESETS, param_count

from step import build, command_line, machine_info, stamp, stats, write_result  # benchmarks/step.py

MODES = ("sync", "async")


def filesystem(path: pathlib.Path) -> str:
    """The filesystem type under `path` (ext4, tmpfs, nfs, ...): it decides what a save costs."""
    path, best, kind = path.resolve(), "", "?"
    try:
        for line in pathlib.Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_mode(bench, compiled, batches: list, mode: str, directory: pathlib.Path, saves: int,
               steps_between: int) -> tuple[dict[str, Any], Any]:
    """`saves` saves of the live state in `mode`, each followed by train steps; returns timings and the state."""
    store = CheckpointStore(directory, CheckpointConfig(async_save=(mode == "async"), keep=2))
    state, blocking, done, step_times = bench.state, [], [], []
    with sharding.use_mesh(bench.mesh):
        for i in range(saves):
            step = int(state["step"])  # host sync outside the timed region
            t0 = time.perf_counter()
            store.save(step, state, meta={})
            t1 = time.perf_counter()
            store.wait()
            t2 = time.perf_counter()
            blocking.append(t1 - t0)
            done.append(t2 - t0)
            for j in range(steps_between):
                t = time.perf_counter()
                state, m = compiled(state, batches[j % len(batches)])
                jax.block_until_ready((state, m))
                step_times.append(time.perf_counter() - t)
    on_disk = dir_bytes(directory / str(step))
    store.close()
    later = lambda xs: stats(xs[1:]) if len(xs) > 1 else None  # noqa: E731
    return dict(mode=mode, saves=saves, blocking_s=blocking, done_s=done, first_blocking_s=blocking[0],
                later_blocking_s=later(blocking), first_done_s=done[0], later_done_s=later(done),
                checkpoint_bytes=on_disk, train_step_s=stats(step_times) if step_times else None), state


def run_preset(preset: str, args: argparse.Namespace, base: pathlib.Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    bench = build(preset, args.batch, args.seq_len, seed=args.seed,
                  steps=len(args.modes) * args.saves * args.steps_between + 10)
    batches = bench.batches(2, seed=args.seed)
    with sharding.use_mesh(bench.mesh):
        compiled = bench.step_fn.lower(bench.state, batches[0]).compile()
        bench.state, _ = compiled(bench.state, batches[0])  # one untimed step: buffers as the loop has them
        jax.block_until_ready(bench.state)
    setup_s = time.perf_counter() - t0
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(bench.state))
    modes = []
    for mode in args.modes:
        directory = base / f"{preset}-{mode}"
        shutil.rmtree(directory, ignore_errors=True)
        result, bench.state = bench_mode(bench, compiled, batches, mode, directory, args.saves, args.steps_between)
        shutil.rmtree(directory, ignore_errors=True)
        modes.append(result)
    return dict(preset=preset, params=param_count(bench.dims), state_bytes=state_bytes, setup_s=setup_s,
                mesh=dict(bench.mesh.shape), modes=modes)


def summary(result: dict) -> str:
    head = (f"{'preset':<7} {'state MB':>8} {'mode':<5} {'first block s':>13} {'later block s':>13} "
            f"{'first done s':>12} {'later done s':>12} {'MB/s':>7}")
    lines = [head, "-" * len(head)]
    for p in result["presets"]:
        mb = p["state_bytes"] / 1e6
        for m in p["modes"]:
            lb, ld = m["later_blocking_s"], m["later_done_s"]
            med_b = f"{lb['median']:.3f}" if lb else "-"
            med_d = f"{ld['median']:.3f}" if ld else "-"
            rate = mb / (ld["median"] if ld else m["first_done_s"])
            lines.append(f"{p['preset']:<7} {mb:>8.1f} {m['mode']:<5} {m['first_blocking_s']:>13.3f} {med_b:>13} "
                         f"{m['first_done_s']:>12.3f} {med_d:>12} {rate:>7.0f}")
    load = result["machine"]["loadavg_start"][0]
    lines.append(f"later = median of saves 2..{result['config']['saves']}; done = save called -> wait() returns; "
                 f"load {load:.2f}; {result['machine']['device_count']}x {result['machine']['device_kind']}; "
                 f"{result['config']['filesystem']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["demo"], choices=sorted(PRESETS),
                   help="one or more presets, each measured in every mode")
    p.add_argument("--saves", type=int, default=5, help="saves per mode (first reported apart)")
    p.add_argument("--steps-between", type=int, default=2, help="train steps between saves")
    p.add_argument("--batch", type=int, default=4, help="batch of the interleaved steps (small: they are not timed)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes, in the order run")
    p.add_argument("--dir", help="where checkpoints are written (default: a temporary folder, deleted after)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON file or folder (default benchmarks/results/, git-ignored; "
                                 "file checkpoint-<date>.json)")
    args = p.parse_args(argv)
    if args.saves < 2 or args.steps_between < 1:
        sys.exit("checkpoint.py: --saves must be >= 2 (the first is reported apart) and --steps-between >= 1")

    machine = machine_info()
    base = pathlib.Path(args.dir) if args.dir else pathlib.Path(tempfile.mkdtemp(prefix="clt-ckpt-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        presets = [run_preset(name, args, base) for name in args.preset]
    except ConfigError as e:
        sys.exit(f"checkpoint.py: {e}")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    machine["loadavg_end"] = list(os.getloadavg())
    result = dict(benchmark="checkpoint", command=command_line(), machine=machine,
                  config=dict(saves=args.saves, steps_between=args.steps_between, batch=args.batch,
                              seq_len=args.seq_len, modes=args.modes, seed=args.seed, directory=str(base),
                              filesystem=filesystem(base)),
                  presets=presets)
    path = write_result(result, args.out, f"checkpoint-{stamp()}.json")
    print(summary(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
