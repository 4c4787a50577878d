"""Replay sampling overhead: host time to build a batch with and without replay, at the demo size.

    python benchmarks/replay.py [--data data/demo] [--steps 300] [--batch 16] [--seq-len 128] [--repeats 20]
        [--out FILE.json]

For three plans that differ only in the second phase's replay (none, 25% mixture replay of the first
phase's domain, 25% from a persistent replay buffer) it times, per batch:
- build: `BatchSource.batch(step)` in one thread (mixture rows, draw indices, epoch permutations, token reads,
  buffer picks): replay sampling's own cost;
- whole pipeline: what `clt train` runs, grain's loader threads plus the transfer to the device.
Each is the minimum over `--repeats` interleaved passes (median, max and mean are in the JSON), with the
overhead relative to no replay; results go to benchmarks/results/ (git-ignored) or --out, with the command and
the machine as every benchmark here records them (`machine_info`, `command_line` of benchmarks/step.py).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from clt import config, plan, replay  # noqa: E402
from step import command_line, machine_info, stamp, stats, write_result  # noqa: E402  (benchmarks/step.py)
import jax  # noqa: E402

from clt.data.pipeline import BatchSource, device_prefetch, iterate  # noqa: E402
from clt.data.shards import DomainData  # noqa: E402


def make_plan(data: str, batch: int, seq_len: int, steps: int, replay_cfg):
    raw = dict(batch_size=batch, data=dict(domains={"prose": f"{data}/prose", "code": f"{data}/code"}, seq_len=seq_len,
                                           block_rows=256),
               replay_buffer=dict(capacity=4096),
               phases=(dict(name="base", steps=steps, mixture={"prose": 1.0}),
                       dict(name="shift", steps=steps, mixture={"code": 1.0}, replay=replay_cfg)))
    return plan.resolve(config.from_dict(raw))


def time_pass(source: BatchSource, steps: range) -> float:
    """Seconds per batch to build host batches in the calling thread (replay sampling's own cost)."""
    t0 = time.perf_counter()
    for s in steps:
        source.batch(s)
    return (time.perf_counter() - t0) / len(steps)


def time_pipeline(source: BatchSource, steps: range, put) -> float:
    """Seconds per batch through the trainer's whole input pipeline: grain's loader threads, then the
    transfer to the device (clt.data.pipeline.iterate + device_prefetch, as in clt train)."""
    t0 = time.perf_counter()
    last = None
    for _, last in device_prefetch(iterate(source, steps.start, steps.stop, prefetch=4), put):
        pass
    jax.block_until_ready(last)
    return (time.perf_counter() - t0) / len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/demo", help="prepared demo data (clt prepare demo --out data/demo)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", help="result JSON file or folder (default benchmarks/results/, git-ignored; "
                                  "file replay-<UTC stamp>.json)")
    args = ap.parse_args()
    machine = machine_info()
    data = {d: DomainData(f"{args.data}/{d}") for d in ("prose", "code")}
    configs = {"none": 0.0, "mixture_25pct": 0.25, "buffer_25pct": dict(share=0.25, source="buffer")}
    sources, results = {}, {}
    tmp = tempfile.TemporaryDirectory()
    for name, replay_cfg in configs.items():
        pl = make_plan(args.data, args.batch, args.seq_len, args.steps, replay_cfg)
        sources[name] = (BatchSource(pl, data), range(pl.phases[1].start, pl.phases[1].end))
        results[name] = {}
        if name == "buffer_25pct":
            t0 = time.perf_counter()
            sources[name][0].buffer = replay.ReplayBuffer(tmp.name, pl, 4096, data).snapshot(pl.phases[1].start)
            results[name]["materialise_s"] = time.perf_counter() - t0
    # Interleave the configurations pass by pass, so drift in the machine's load hits all of them alike;
    # the minimum over passes is the least disturbed estimate (timeit's convention), the median is shown too.
    put = lambda b: jax.device_put(b["tokens"])  # noqa: E731
    passes = {name: [] for name in configs}
    full = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (source, steps) in sources.items():
            passes[name].append(time_pass(source, steps))
            full[name].append(time_pipeline(source, steps, put))
    tmp.cleanup()
    for name in configs:
        build, pipeline = stats(passes[name]), stats(full[name])
        results[name].update(per_batch_ms=build["min"] * 1e3, median_ms=build["median"] * 1e3,
                             pipeline_ms=pipeline["min"] * 1e3, pipeline_median_ms=pipeline["median"] * 1e3,
                             build_per_batch_s=build, pipeline_per_batch_s=pipeline)
    for r in results.values():
        r["overhead_pct"] = 100 * (r["per_batch_ms"] / results["none"]["per_batch_ms"] - 1)
        r["pipeline_overhead_pct"] = 100 * (r["pipeline_ms"] / results["none"]["pipeline_ms"] - 1)
    machine["loadavg_end"] = list(os.getloadavg())
    out = dict(benchmark="replay", command=command_line(), machine=machine, config=vars(args), results=results)
    path = write_result(out, args.out, f"replay-{stamp()}.json")  # not under the cwd: the script's results/
    for name, r in results.items():
        extra = f", buffer materialised in {r['materialise_s']:.2f} s" if "materialise_s" in r else ""
        print(f"{name:<14} build {r['per_batch_ms']:6.3f} ms/batch ({r['overhead_pct']:+5.1f}%)   "
              f"whole pipeline {r['pipeline_ms']:6.3f} ms/batch ({r['pipeline_overhead_pct']:+5.1f}%){extra}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
