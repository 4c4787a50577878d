"""Where a `clt train` run's time goes: train steps, eval, checkpoint saves (the time the loop is blocked), compile.

    python benchmarks/loop_time.py [--quick] [--config configs/demo.py] [--data data/demo] [--out FILE.jsonl]

Trains the config (the demo by default: its checkpoint interval, eval schedule and log interval, as `make demo`
runs it) in a fresh temporary workdir and reads the `time` the loop records in its `finished` event
(`clt.metrics.StepClock`: train steps alone, eval, the part of each save that blocks the loop, the first step's
compile). It prints one JSON line with each share of the loop's wall time, `checkpoint_share` being the
issue's target (async checkpoint blocking < 1% of wall time at the demo's checkpoint interval), and appends it
to benchmarks/results/loop_time.jsonl. The demo data is prepared into the temporary folder unless `--data`
holds it. `--quick` runs configs/smoke.py instead (28 tiny steps, a save every 8: a much denser schedule than
the demo's, so a pessimistic share, in about half a minute).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

from step import command_line, machine_info, record  # benchmarks/ is sys.path[0]

from clt import config, train  # noqa: E402
from clt.config import ConfigError  # noqa: E402
from clt.data import prepare  # noqa: E402
from clt.data.shards import domain_exists  # noqa: E402
from clt.metrics import read_jsonl  # noqa: E402
from clt.plan import resolve  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace, tmp: pathlib.Path) -> dict:
    machine = machine_info()
    data = pathlib.Path(args.data)
    if not all(domain_exists(str(data / d)) for d in ("prose", "code")):
        data = tmp / "demo"
        prepare.prepare_demo(str(data), progress=False)
    domains = {"prose": str(data / "prose"), "code": str(data / "code")}
    cfg = config.load(args.config, [f"data.domains={domains!r}"])
    wd = tmp / "run"
    t0 = time.perf_counter()
    train.train(cfg, str(wd), progress=False)
    wall = time.perf_counter() - t0
    finished = next(e for e in read_jsonl(wd / "events.jsonl") if e["event"] == "finished")
    spent = finished["time"]
    loop = sum(spent.values())
    saves = [e for e in read_jsonl(wd / "events.jsonl") if e["event"] == "checkpoint"]
    machine["loadavg_end"] = list(os.getloadavg())
    config_name = os.path.relpath(args.config, REPO) if pathlib.Path(args.config).is_relative_to(REPO) else args.config
    return dict(benchmark="loop_time", command=command_line(), machine=machine, config=config_name,
                steps=resolve(cfg).total_steps, checkpoint_every=cfg.checkpoint.every, saves=len(saves),
                log_every=cfg.log.every, time=spent, loop_s=loop, wall_s=wall,
                shares={k.removesuffix("_s"): v / loop for k, v in spent.items()},
                checkpoint_share=spent["checkpoint_s"] / loop)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, `config` filled in; a bad option is one line and exit 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="configs/smoke.py instead of the demo (~30 s)")
    p.add_argument("--config", help="the config to train (default configs/demo.py; --quick: configs/smoke.py)")
    p.add_argument("--data", default=str(REPO / "data" / "demo"), help="prepared demo data (else prepared here)")
    p.add_argument("--out", help="results file (.jsonl) to append to (default benchmarks/results/loop_time.jsonl)")
    args = p.parse_args(argv)
    if args.quick and args.config:
        p.error("--quick trains configs/smoke.py; drop --config or --quick")
    args.config = args.config or str(REPO / "configs" / ("smoke.py" if args.quick else "demo.py"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clt-loop-time-") as tmp:
        try:
            result = run(args, pathlib.Path(tmp))
        except ConfigError as e:
            sys.exit(f"loop_time.py: {e}")
    path = record(result, args.out, "loop_time")
    shares = " | ".join(f"{k} {v:.1%}" for k, v in result["shares"].items())
    print(f"{pathlib.Path(args.config).name}: {result['loop_s']:.1f}s in the loop: {shares} "
          f"({result['saves']} saves, every {result['checkpoint_every']} steps)\nappended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
