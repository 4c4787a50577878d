"""Replay sampling overhead: host time to build a batch with and without replay, at the demo size.

    python benchmarks/replay.py [--data data/demo] [--steps 300] [--batch 16] [--seq-len 128]

Builds `BatchSource.batch(step)` (the whole data-pipeline work for one step: mixture rows, draw indices,
epoch permutations, token reads, buffer picks) for three plans that differ only in the second phase's replay:
none, 25% mixture replay of the first phase's domain, and 25% from a persistent replay buffer. Reports the
median time per batch and the overhead relative to no replay, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from clt import config, plan, replay  # noqa: E402
from clt.data.pipeline import BatchSource  # noqa: E402
from clt.data.shards import DomainData  # noqa: E402


def make_plan(data: str, batch: int, seq_len: int, steps: int, replay_cfg):
    raw = dict(batch_size=batch, data=dict(domains={"prose": f"{data}/prose", "code": f"{data}/code"}, seq_len=seq_len,
                                           block_rows=256),
               replay_buffer=dict(capacity=4096),
               phases=(dict(name="base", steps=steps, mixture={"prose": 1.0}),
                       dict(name="shift", steps=steps, mixture={"code": 1.0}, replay=replay_cfg)))
    return plan.resolve(config.from_dict(raw))


def time_batches(source: BatchSource, steps: range, repeats: int) -> float:
    """Median seconds per batch over `repeats` passes of `steps`."""
    per_pass = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in steps:
            source.batch(s)
        per_pass.append((time.perf_counter() - t0) / len(steps))
    return statistics.median(per_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/demo", help="prepared demo data (clt prepare demo --out data/demo)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON result path (default benchmarks/results/replay-<date>.json)")
    args = ap.parse_args()
    data = {d: DomainData(f"{args.data}/{d}") for d in ("prose", "code")}
    results = {}
    for name, replay_cfg in (("none", 0.0), ("mixture_25pct", 0.25), ("buffer_25pct", dict(share=0.25,
                                                                                          source="buffer"))):
        pl = make_plan(args.data, args.batch, args.seq_len, args.steps, replay_cfg)
        source = BatchSource(pl, data)
        if name == "buffer_25pct":
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                source.buffer = replay.ReplayBuffer(tmp, pl, 4096, data).snapshot(pl.phases[1].start)
                materialise_s = time.perf_counter() - t0
                per_batch = time_batches(source, range(pl.phases[1].start, pl.phases[1].end), args.repeats)
            results[name] = dict(per_batch_ms=per_batch * 1e3, materialise_s=materialise_s)
        else:
            per_batch = time_batches(source, range(pl.phases[1].start, pl.phases[1].end), args.repeats)
            results[name] = dict(per_batch_ms=per_batch * 1e3)
    base = results["none"]["per_batch_ms"]
    for r in results.values():
        r["overhead_pct"] = 100 * (r["per_batch_ms"] / base - 1)
    out = dict(benchmark="replay", date=datetime.datetime.now().isoformat(timespec="seconds"),
               machine=dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version()),
               load_avg=os.getloadavg(), args=vars(args), results=results)
    path = pathlib.Path(args.out or f"benchmarks/results/replay-{datetime.date.today()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    for name, r in results.items():
        extra = f", buffer materialised in {r['materialise_s']:.2f} s" if "materialise_s" in r else ""
        print(f"{name:<14} {r['per_batch_ms']:7.3f} ms/batch  overhead {r['overhead_pct']:+6.1f}%{extra}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
