"""Train-step throughput and MFU: the number that says whether a preset, mesh and batch are worth launching.

    python benchmarks/step.py --preset demo --batch 16 --seq-len 128 [--steps 20] [--warmup 3] [--dtype auto]
        [--remat none] [--mesh data=-1,fsdp=1,tensor=1] [--vocab 384] [--out FILE.json]

Builds the model and the jitted, donated train step exactly as `clt train` does (step.state_layout,
step.init_state, step.compile_step), feeds random tokens (the step's cost does not depend on their values),
and times each step to `jax.block_until_ready`. Compile time is measured apart (lower + compile, no
persistent cache), and the reported step time is the median over `--steps` after `--warmup` steps, because
shared machines make single timings noisy. FLOPs per token follow `model.flops_per_token` (PaLM appendix B),
so MFU is comparable to published numbers; it needs a known dense bf16 peak (metrics.PEAK_FLOPS) and is "n/a"
otherwise (e.g. on CPU). Simulate devices on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8.

`machine_info`, `command_line`, `stats`, `build`, `record`, `write_result` and `stamp` are shared with the other
benchmarks in this folder: they run as scripts (`python benchmarks/X.py` puts benchmarks/ first on sys.path)
and `from step import ...` them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clt import config, plan as plan_lib, sharding, step as step_lib
from clt.config import ConfigError
from clt.data.tokenizer import ByteTokenizer
from clt.metrics import peak_flops
from clt.model import ModelDims, PRESETS, REMAT_POLICIES, flops_per_token, param_count
from clt.optim import make_optimizer

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MESH_AXES = ("data", "fsdp", "tensor")
MESH_FORMAT = "AXIS=SIZE[,AXIS=SIZE...] with AXIS in data, fsdp, tensor and at most one SIZE -1, " \
              "e.g. data=-1,fsdp=1,tensor=1"
# The byte tokenizer's vocabulary padded to a multiple of 128, as step.model_dims pads the data's vocab.
BYTE_VOCAB = -(-ByteTokenizer.vocab_size // 128) * 128


# ----------------------------------------------------------------------------------------------------------
# Shared by the benchmarks: machine description, mesh parsing, building the model and step.
# ----------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What a number was measured on: without it a benchmark result cannot be compared or reproduced."""
    dev = jax.devices()[0]
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hostname=platform.node(), platform=platform.platform(), python=platform.python_version(),
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        backend=jax.default_backend(), device_kind=dev.device_kind, device_count=jax.device_count(),
        process_count=jax.process_count(), versions=versions, xla_flags=os.environ.get("XLA_FLAGS", ""),
        loadavg_start=list(os.getloadavg()),
    )


def parse_mesh(text: str) -> config.MeshConfig:
    """"data=-1,fsdp=2" -> MeshConfig; unnamed axes keep their defaults. ValueError (one line) when malformed."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in MESH_AXES or name in sizes:
            raise ValueError(f"--mesh {text!r}: bad axis {part.strip()!r}; expected {MESH_FORMAT}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size {value!r} is not an integer; expected {MESH_FORMAT}") from None
    mesh = config.MeshConfig(**sizes)
    try:
        mesh.check("mesh")
    except ConfigError as e:
        raise ValueError(f"--mesh {text!r}: {e}; expected {MESH_FORMAT}") from None
    return mesh


def stats(times: list[float]) -> dict[str, float]:
    """Median and spread of repeated timings (the median is the number quoted; min/max show the noise)."""
    return dict(median=statistics.median(times), min=min(times), max=max(times),
                mean=statistics.fmean(times), n=len(times))


@dataclass
class StepBench:
    """Everything a benchmark needs to run train steps: built as `clt train` builds it."""

    cfg: config.Config
    dims: ModelDims
    mesh: Mesh
    state: dict
    step_fn: Callable  # jitted step.train_step with in/out shardings and the state donated
    batch_sh: NamedSharding

    def batches(self, n: int, seed: int = 0) -> list[jax.Array]:
        """`n` random token batches (batch, seq_len + 1) on the mesh: the step predicts tokens 1..L from 0..L-1."""
        rng = np.random.default_rng(seed)
        shape = (self.cfg.batch_size, self.cfg.data.seq_len + 1)
        return [jax.device_put(rng.integers(0, self.dims.vocab_size, shape, dtype=np.int32), self.batch_sh)
                for _ in range(n)]


def build(preset: str, batch: int, seq_len: int, *, dtype: str = "auto", remat: str = "none",
          mesh: config.MeshConfig = config.MeshConfig(), vocab: int = BYTE_VOCAB, steps: int = 1000,
          seed: int = 0) -> StepBench:
    """The sharded model, its train state and the jitted step, validated through clt's own config (so a bad
    preset, dtype or mesh gives the same error as `clt train`). `steps` only sizes the constant-LR plan."""
    cfg = config.from_dict(dict(
        model=dict(preset=preset, dtype=dtype, remat=remat, vocab_size=vocab),
        mesh=dict(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor),
        data=dict(domains={"a": "-"}, seq_len=seq_len), batch_size=batch, seed=seed,
        phases=(dict(name="p", steps=max(steps, 1), mixture={"a": 1.0},
                     schedule=dict(kind="constant", peak=1e-3)),)))
    dims = step_lib.resolve_dims(cfg.model, vocab)
    jax_mesh = sharding.make_mesh(cfg.mesh)
    shards = jax_mesh.shape["data"] * jax_mesh.shape["fsdp"]
    if batch % shards:
        raise ConfigError("batch_size", batch, f"does not divide the {shards} batch shards (data x fsdp)",
                          f"use a multiple of {shards}")
    tx = make_optimizer(cfg.optim)
    graphdef, params, _, state_sh = step_lib.state_layout(
        dims, jax_mesh, tx, seed=seed, dtype=step_lib.compute_dtype(cfg.model.dtype),
        param_dtype=np.dtype(cfg.model.param_dtype), remat=cfg.model.remat)
    state = step_lib.init_state(params, tx, state_sh)
    del params  # the state owns the params now; the step donates it
    batch_sh = sharding.batch_sharding(jax_mesh)
    step_fn = step_lib.compile_step(graphdef, tx, plan_lib.resolve(cfg), cfg.optim, state_sh, batch_sh,
                                    sharding.replicated(jax_mesh))
    return StepBench(cfg=cfg, dims=dims, mesh=jax_mesh, state=state, step_fn=step_fn, batch_sh=batch_sh)


def command_line() -> str:
    """The command as typed from the repo root (the interpreter relative when it lives under the cwd)."""
    exe = os.path.relpath(sys.executable)
    env = [f"XLA_FLAGS={os.environ['XLA_FLAGS']}"] if os.environ.get("XLA_FLAGS") else []
    return " ".join([*env, exe if not exe.startswith("..") else sys.executable, *sys.argv])


def write_result(result: dict, out: str | None, default_name: str) -> pathlib.Path:
    """Write to `out` (a .json file, or a folder for the default name), else to benchmarks/results/, which git
    ignores: a run leaves no untracked files; `git add -f` the results that BENCHMARKS.md quotes."""
    path = pathlib.Path(out) if out else RESULTS
    if path.suffix != ".json":
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def record(result: dict, out: str | None, name: str) -> pathlib.Path:
    """Print `result` as one JSON line and append that line to `out` (a .jsonl file), by default
    benchmarks/results/<name>.jsonl: one file per benchmark holds every run of it, each line with its machine,
    date, versions and command, so BENCHMARKS.md can quote a line and a rerun adds one."""
    line = json.dumps(result, separators=(",", ":"))
    print(line)
    path = pathlib.Path(out) if out else RESULTS / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    return path


def stamp() -> str:
    """Date and time for result file names: several runs a day must not overwrite each other."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------------------------------------
# The step benchmark.
# ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, mesh_cfg: config.MeshConfig) -> dict[str, Any]:
    machine = machine_info()
    t0 = time.perf_counter()
    bench = build(args.preset, args.batch, args.seq_len, dtype=args.dtype, remat=args.remat, mesh=mesh_cfg,
                  vocab=args.vocab, steps=args.warmup + args.steps + 1, seed=args.seed)
    jax.block_until_ready(bench.state)
    build_s = time.perf_counter() - t0
    batches = bench.batches(4, seed=args.seed)

    with sharding.use_mesh(bench.mesh):
        t0 = time.perf_counter()
        lowered = bench.step_fn.lower(bench.state, batches[0])
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        state, times, losses = bench.state, [], []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            state, m = compiled(state, batches[i % len(batches)])
            jax.block_until_ready((state, m))
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(m["loss"]))

    dims, B, L = bench.dims, args.batch, args.seq_len
    step_s = stats(times)
    tokens_per_s = B * L / step_s["median"]
    fpt = flops_per_token(dims, L)
    achieved = tokens_per_s * fpt
    peak = peak_flops(machine["device_kind"])
    if peak:
        mfu, mfu_note = achieved / (peak * jax.device_count()), f"peak {peak / 1e12:.0f} TFLOP/s per device"
    else:
        mfu, mfu_note = None, (f"n/a: no dense bf16 peak known for device kind {machine['device_kind']!r} "
                               "(metrics.PEAK_FLOPS)")
    mem = jax.devices()[0].memory_stats() or {}
    machine["loadavg_end"] = list(os.getloadavg())
    return dict(
        benchmark="step", command=command_line(), machine=machine,
        config=dict(preset=args.preset, batch=B, seq_len=L, dtype=args.dtype,
                    compute_dtype=str(np.dtype(step_lib.compute_dtype(args.dtype))), remat=args.remat,
                    mesh=dict(bench.mesh.shape), vocab=dims.vocab_size, steps=args.steps, warmup=args.warmup,
                    seed=args.seed),
        params=param_count(dims), dims=dict(vars(dims)),
        build_s=build_s, lower_s=t1 - t0, compile_s=t2 - t1, step_s=step_s, step_times_s=times,
        tokens_per_step=B * L, tokens_per_s=tokens_per_s, flops_per_token=fpt, achieved_tflops=achieved / 1e12,
        peak_tflops_per_device=peak / 1e12 if peak else None, mfu=mfu, mfu_note=mfu_note,
        loss_first=losses[0], loss_last=losses[-1], peak_bytes_in_use=mem.get("peak_bytes_in_use"),
    )


def summary(r: dict) -> str:
    c, s = r["config"], r["step_s"]
    mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (no peak for " \
        f"{r['machine']['device_kind']!r})"
    return (f"step {c['preset']} ({r['params'] / 1e6:.2f}M params) {c['batch']}x{c['seq_len']} "
            f"{c['compute_dtype']} remat={c['remat']} mesh={c['mesh']} on {r['machine']['device_count']}x "
            f"{r['machine']['device_kind']}: compile {r['compile_s']:.1f}s | step {s['median'] * 1e3:.1f} ms "
            f"median of {s['n']} (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f}) | "
            f"{r['tokens_per_s'] / 1e3:.1f}k tok/s | {r['flops_per_token'] / 1e6:.1f} MFLOP/token | "
            f"{r['achieved_tflops']:.3f} TFLOP/s | {mfu} | load {r['machine']['loadavg_start'][0]:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help=MESH_FORMAT)
    p.add_argument("--vocab", type=int, default=BYTE_VOCAB,
                   help="vocabulary size (default: the byte tokenizer's, padded to a multiple of 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result JSON file or folder (default benchmarks/results/, git-ignored; "
                                 "file step-<preset>-<date>.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        sys.exit("step.py: --steps must be >= 1 and --warmup >= 0")
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        sys.exit(f"step.py: {e}")
    try:
        result = run(args, mesh)
    except ConfigError as e:  # a preset, batch or mesh the model rejects: one line naming the field
        sys.exit(f"step.py: {e}")
    path = write_result(result, args.out, f"step-{args.preset}-{stamp()}.json")
    print(summary(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
