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
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from clt import config, plan as plan_lib, sharding, step as step_lib
from clt.config import ConfigError
from clt.data.tokenizer import ByteTokenizer
from clt.metrics import peak_flops
from clt.model import ATTENTION_FLOPS, PRESETS, REMAT_POLICIES, ModelDims, Transformer, flops_per_token, param_count
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
    attention: str  # the kernel chosen (clt.attention.choose)

    def batches(self, n: int, seed: int = 0) -> list[jax.Array]:
        """`n` random token batches (batch, seq_len + 1) on the mesh: the step predicts tokens 1..L from 0..L-1."""
        rng = np.random.default_rng(seed)
        shape = (self.cfg.batch_size, self.cfg.data.seq_len + 1)
        return [jax.device_put(rng.integers(0, self.dims.vocab_size, shape, dtype=np.int32), self.batch_sh)
                for _ in range(n)]


def build(preset: str, batch: int, seq_len: int, *, dtype: str = "auto", remat: str = "none",
          mesh: config.MeshConfig = config.MeshConfig(), vocab: int = BYTE_VOCAB, steps: int = 1000,
          seed: int = 0, attention: str = "auto", abstract: bool = False) -> StepBench:
    """The sharded model, its train state and the jitted step, validated through clt's own config (so a bad
    preset, dtype or mesh gives the same error as `clt train`). `steps` only sizes the constant-LR plan."""
    cfg = config.from_dict(dict(
        model=dict(preset=preset, dtype=dtype, remat=remat, vocab_size=vocab, attention=attention),
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
    options = step_lib.model_options(cfg, -1, dims)  # the attention kernel as `clt train` would choose it
    if abstract:  # shapes and shardings only: what compiling needs, with no device memory (8b on a laptop)
        graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(dims, rngs=nnx.Rngs(0), **options)))
        shapes = jax.eval_shape(functools.partial(step_lib.new_state, tx=tx), params)
        state_sh = sharding.shardings_of(jax_mesh, shapes)
        state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, state_sh)
    else:
        graphdef, params, _, state_sh = step_lib.state_layout(dims, jax_mesh, tx, seed=seed, **options)
        state = step_lib.init_state(params, tx, state_sh)
        del params  # the state owns the params now; the step donates it
    batch_sh = sharding.batch_sharding(jax_mesh)
    step_fn = step_lib.compile_step(graphdef, tx, plan_lib.resolve(cfg), cfg.optim, state_sh, batch_sh,
                                    sharding.replicated(jax_mesh))
    return StepBench(cfg=cfg, dims=dims, mesh=jax_mesh, state=state, step_fn=step_fn, batch_sh=batch_sh,
                     attention=options["attention"])


def time_steps(compiled: Callable, state: Any, batches: list[jax.Array], warmup: int, steps: int
               ) -> tuple[list[float], list[float]]:
    """(seconds of each of `steps` steps after `warmup` untimed ones, every step's loss): each step timed to
    `jax.block_until_ready`, cycling through `batches`. The state is donated step to step."""
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
    return times, losses


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
QUICK = (("tiny", 128), ("tiny", 512), ("demo", 128), ("demo", 512))
"""--quick: about a minute on a 2-core CPU."""
FULL = tuple((p, L) for p in ("tiny", "125m", "1b") for L in (512, 1024, 2048, 4096)) + (("8b", 2048),)
"""The default grid (an accelerator's): every preset the issue names at seq 512-4096, and 8b where it fits."""


def memory(compiled) -> dict[str, int] | None:
    """XLA's per-device memory plan of the compiled step (bytes): arguments (state + batch), outputs, temporaries
    (activations, gradients), minus what donation aliases. None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
               alias=m.alias_size_in_bytes, code=m.generated_code_size_in_bytes)
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def run_case(args: argparse.Namespace, mesh_cfg: config.MeshConfig, preset: str, L: int) -> dict[str, Any]:
    """One (preset, seq_len): compile, then (unless --compile-only) time the steps."""
    machine = machine_info()
    B = args.batch
    t0 = time.perf_counter()
    bench = build(preset, B, L, dtype=args.dtype, remat=args.remat, mesh=mesh_cfg, vocab=args.vocab,
                  steps=args.warmup + args.steps + 1, seed=args.seed, attention=args.attention,
                  abstract=args.compile_only)
    jax.block_until_ready(bench.state)
    build_s = time.perf_counter() - t0
    batch0 = jax.ShapeDtypeStruct((B, L + 1), np.int32, sharding=bench.batch_sh)
    with sharding.use_mesh(bench.mesh):
        t0 = time.perf_counter()
        lowered = bench.step_fn.lower(bench.state, batch0)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        times, losses = [], []
        if not args.compile_only:
            times, losses = time_steps(compiled, bench.state, bench.batches(4, seed=args.seed), args.warmup,
                                       args.steps)

    dims = bench.dims
    fpt = flops_per_token(dims, L)
    peak = peak_flops(machine["device_kind"])
    dev_mem = (jax.devices()[0].memory_stats() or {})
    result = dict(
        benchmark="step", command=command_line(), machine=machine,
        config=dict(preset=preset, batch=B, seq_len=L, dtype=args.dtype,
                    compute_dtype=str(np.dtype(step_lib.compute_dtype(args.dtype))), remat=args.remat,
                    attention=bench.attention, mesh=dict(bench.mesh.shape), vocab=dims.vocab_size,
                    steps=args.steps, warmup=args.warmup, seed=args.seed, compile_only=args.compile_only),
        params=param_count(dims), build_s=build_s, lower_s=t1 - t0, compile_s=t2 - t1,
        memory_per_device=memory(compiled), device_memory_limit=dev_mem.get("bytes_limit"),
        tokens_per_step=B * L, flops_per_token=fpt, flops_convention=f"{ATTENTION_FLOPS} attention (MaxText)",
        peak_tflops_per_device=peak / 1e12 if peak else None)
    if times:
        step_s = stats(times)
        tokens_per_s = B * L / step_s["median"]
        achieved = tokens_per_s * fpt
        result.update(step_s=step_s, step_times_s=times, tokens_per_s=tokens_per_s, achieved_tflops=achieved / 1e12,
                      mfu=achieved / (peak * jax.device_count()) if peak else None,
                      loss_first=losses[0], loss_last=losses[-1], peak_bytes_in_use=dev_mem.get("peak_bytes_in_use"))
    machine["loadavg_end"] = list(os.getloadavg())
    return result


def summary(r: dict) -> str:
    c = r["config"]
    head = (f"step {c['preset']} ({r['params'] / 1e6:.1f}M) {c['batch']}x{c['seq_len']} {c['compute_dtype']} "
            f"remat={c['remat']} attn={c['attention']} mesh={c['mesh']} on {r['machine']['device_count']}x "
            f"{r['machine']['device_kind']}: compile {r['compile_s']:.1f}s")
    mem = r["memory_per_device"]
    if mem:
        head += f" | XLA memory plan {mem['peak_estimate'] / 2**30:.2f} GiB/device"
    if "step_s" not in r:
        return head
    s = r["step_s"]
    mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (no peak known)"
    return (f"{head} | step {s['median'] * 1e3:.1f} ms median of {s['n']} (min {s['min'] * 1e3:.1f}, max "
            f"{s['max'] * 1e3:.1f}) | {r['tokens_per_s'] / 1e3:.1f}k tok/s | {r['flops_per_token'] / 1e6:.1f} "
            f"MFLOP/token ({r['flops_convention']}) | {r['achieved_tflops']:.3f} TFLOP/s | {mfu}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, config.MeshConfig, tuple[tuple[str, int], ...]]:
    """(options, mesh, the (preset, seq_len) cases); a bad option is one line and exit 2."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="presets (default: the grid, see FULL)")
    p.add_argument("--seq-len", nargs="+", type=int, help="sequence lengths, crossed with --preset")
    p.add_argument("--quick", action="store_true", help=f"the CPU grid {QUICK}, about a minute on 2 cores")
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "splash"))
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help=MESH_FORMAT)
    p.add_argument("--compile-only", action="store_true",
                   help="compile on abstract shapes (no memory allocated) and report XLA's per-device memory plan")
    p.add_argument("--vocab", type=int, default=BYTE_VOCAB,
                   help="vocabulary size (default: the byte tokenizer's, padded to a multiple of 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results file (.jsonl) to append to (default benchmarks/results/step.jsonl)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.quick and (args.preset or args.seq_len):
        p.error("--quick is its own grid; drop --preset/--seq-len or --quick")
    if args.quick:
        cases = QUICK
        args.steps, args.warmup, args.batch = min(args.steps, 5), min(args.warmup, 2), min(args.batch, 8)
    elif args.preset or args.seq_len:
        cases = tuple((pr, L) for pr in (args.preset or ["demo"]) for L in (args.seq_len or [128]))
    else:
        cases = FULL
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    return args, mesh, cases


def main(argv: list[str] | None = None) -> None:
    args, mesh, cases = parse_args(argv)
    for preset, L in cases:
        try:
            result = run_case(args, mesh, preset, L)
        except ConfigError as e:  # a preset, batch, mesh or kernel the model rejects: one line naming the field
            sys.exit(f"step.py: {e}")
        path = record(result, args.out, "step")
        print(summary(result), file=sys.stderr)
    print(f"appended {len(cases)} line(s) to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
