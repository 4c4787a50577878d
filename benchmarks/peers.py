"""clt's train step next to its peers on the same machine and shape: PyTorch `transformers` and MaxText.

    python benchmarks/peers.py [--quick] [--preset 1b] [--batch 8] [--seq-len 2048] [--steps 20] [--warmup 3]
        [--dtype auto|float32|bfloat16] [--[no-]compile] [--no-transformers] [--no-maxtext] [--maxtext-python PYTHON]
        [--maxtext-attention auto] [--maxtext-remat minimal_with_context] [--out FILE.jsonl]

One model shape (clt's preset: ModelDims, vocabulary 384 = the byte tokenizer's padded), one global batch of
`--batch` x `--seq-len` random tokens, three implementations of a full train step (forward, next-token
cross-entropy, backward, global-norm clip 1.0, AdamW b1 0.9 b2 0.95 eps 1e-8 weight decay 0.1 on matrices):

- clt: the model, sharded state and jitted, donated step exactly as `clt train` builds them (benchmarks/step.py's
  `build`), each step timed to `jax.block_until_ready`.
- transformers: `LlamaForCausalLM` from a `LlamaConfig` made by clt's own mapping (`clt.hf.arch.hf_config`, the
  config.json `clt hf export` writes, so the dims are the same by construction), `attn_implementation="sdpa"`
  (PyTorch picks its flash kernel on a GPU), compiled with `torch.compile` (`--no-compile` to skip; off by default with `--quick`), AdamW with
  `fused=True` where PyTorch has it for the device (else foreach), `clip_grad_norm_`, `zero_grad(set_to_none=True)`;
  each step timed to `torch.cuda.synchronize()` on a GPU. Precision follows clt's `--dtype`: float32 weights and
  optimizer state always; with bfloat16 (the default on a GPU with bf16), forward and backward run under
  `torch.autocast(bfloat16)`, as clt computes in bf16 from float32 params. On CPU the default is float32 (bf16
  matmuls are slow there), both for clt and for PyTorch. It runs in a child process (its own CUDA context and
  memory, freed when it exits).
- MaxText (`maxtext` on PyPI, Python >= 3.12): `python -m maxtext.trainers.pre_train.train <its base.yml>` with the
  same dims, batch, seq_len, dtype, optimizer settings and `dataset_type=synthetic`, run in a subprocess by
  `--maxtext-python` (default: this interpreter) when that interpreter can import it; its per-step times come
  from its "completed step: N, seconds: S, TFLOP/s/device: T" log lines. Otherwise the result says
  `maxtext: {"ran": false, "why": ...}` with the exact reason. MaxText has no "no remat" policy: the default
  `--maxtext-remat minimal_with_context` is its fastest (it saves the most); its layers are scanned (its default).

Each side: `--warmup` untimed steps after its compile, then `--steps` timed steps; median step time, tokens/s,
achieved TFLOP/s and MFU by clt's FLOPs formula (`clt.model.flops_per_token`, PaLM appendix B) and clt's peak table
(`clt.metrics.peak_flops`, none for CPU: MFU n/a), computed in one place (`throughput`) for all three. MaxText
logs the time between step dispatches, which async dispatch makes uneven (a short step follows a long one), so its
figure is the mean of the timed steps (their sum is the wall time), reported beside its median and its own
TFLOP/s. Ratios: clt tokens/s over each peer's. Sides run one after another: MaxText, transformers, then clt (the
children run before this process's JAX touches a GPU: JAX reserves most of its memory when it starts).
`--quick`: the demo preset at 8 x 128, 10 steps after 3 warm-up (about a minute on 2 CPU cores without MaxText,
about 1.5 minutes with it). Prints one JSON line and appends it to benchmarks/results/peers.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import numpy as np

from step import BYTE_VOCAB, build, command_line, machine_info, record, stats, time_steps  # benchmarks/ on sys.path

from clt import config, step as step_lib
from clt.config import ConfigError
from clt.hf.arch import hf_config
from clt.metrics import peak_flops
from clt.model import PRESETS, ModelDims, flops_per_token, param_count

QUICK = dict(preset="demo", batch=8, seq_len=128, steps=10, warmup=3)
DEFAULTS = dict(preset="1b", batch=8, seq_len=2048, steps=20, warmup=3)
MAXTEXT_MODULE = "maxtext.trainers.pre_train.train"
MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)(?:, TFLOP/s/device: ([0-9.]+))?")
MAXTEXT_REMATS = ("minimal_with_context", "minimal", "save_dot_with_context_except_mlp", "save_dot_except_mlpwi",
                  "save_dot_except_mlp", "save_qkv_proj", "save_out_proj", "full")
MAXTEXT_ATTENTIONS = ("auto", "dot_product", "cudnn_flash_jax", "cudnn_flash_te", "flash", "autoselected")
MAXTEXT_TIMEOUT_S = 1800


# ----------------------------------------------------------------------------------------------------------
# Arguments and the shared shape.
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; --quick fills in the sizes not given. Bad values exit 2 with one line (argparse's error)."""
    p = argparse.ArgumentParser(prog="peers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small CPU run: {QUICK}")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"model preset (default {DEFAULTS['preset']})")
    p.add_argument("--batch", type=int, help=f"global batch in sequences (default {DEFAULTS['batch']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    p.add_argument("--steps", type=int, help=f"timed steps per side (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps after compiling (default {DEFAULTS['warmup']})")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of every side; auto = float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the transformers model (default: on; off with --quick: inductor takes "
                        "about a minute to compile the demo model on 2 CPU cores)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--no-maxtext", action="store_true", help="skip MaxText (recorded as not run, and why)")
    p.add_argument("--maxtext-python", default=sys.executable,
                   help="interpreter that can import maxtext (Python >= 3.12; default: this one)")
    p.add_argument("--maxtext-attention", default="auto", choices=MAXTEXT_ATTENTIONS,
                   help="MaxText's attention kernel; auto = cudnn_flash_jax on GPU, dot_product elsewhere")
    p.add_argument("--maxtext-remat", default="minimal_with_context", choices=MAXTEXT_REMATS,
                   help="MaxText's remat_policy (it has no 'none'; this one saves the most)")
    p.add_argument("--out", help="JSONL file to append the result to (default benchmarks/results/peers.jsonl)")
    p.add_argument("--torch-child", help=argparse.SUPPRESS)  # internal: run the transformers side, print JSON
    args = p.parse_args(argv)
    if args.torch_child:
        return args
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile is None:
        args.compile = not args.quick
    if min(args.batch, args.seq_len, args.steps) < 1 or args.warmup < 0:
        p.error("--batch, --seq-len and --steps must be >= 1, --warmup >= 0")
    if args.seq_len % 2:
        p.error(f"--seq-len {args.seq_len} must be even")
    return args


def model_dims(preset: str, vocab: int = BYTE_VOCAB) -> ModelDims:
    """The preset's dims as clt resolves them (the same for all three sides)."""
    return step_lib.resolve_dims(config.ModelConfig(preset=preset, vocab_size=vocab), vocab)


def throughput(step_s: float, tokens_per_step: int, dims: ModelDims, seq_len: int, device_kind: str,
               n_devices: int) -> dict:
    """tokens/s, achieved TFLOP/s and MFU of a step time, by clt's FLOPs formula and peak table: the one place
    every side's MFU is computed."""
    tokens_per_s = tokens_per_step / step_s
    achieved = tokens_per_s * flops_per_token(dims, seq_len)
    peak = peak_flops(device_kind)
    return dict(tokens_per_s=tokens_per_s, achieved_tflops=achieved / 1e12,
                mfu=achieved / (peak * n_devices) if peak else None,
                mfu_note=f"peak {peak / 1e12:.0f} TFLOP/s per device" if peak else
                f"n/a: no dense bf16 peak known for device kind {device_kind!r} (clt.metrics.peak_flops)")


def llama_config(dims: ModelDims, seq_len: int) -> dict:
    """transformers' LlamaConfig keyword arguments for `dims`: clt's own config.json mapping (clt/hf/arch.py)."""
    cfg = hf_config(dims, max_position_embeddings=max(seq_len, 2048), bos_id=None, eos_id=None, dtype="float32")
    if cfg["architectures"] != ["LlamaForCausalLM"]:
        raise ValueError(f"preset maps to {cfg['architectures'][0]}, not LlamaForCausalLM")
    for key in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(key)
    cfg["use_cache"] = False
    return cfg


# ----------------------------------------------------------------------------------------------------------
# clt.
# ----------------------------------------------------------------------------------------------------------
def run_clt(args: argparse.Namespace) -> dict:
    from clt import sharding

    t0 = time.perf_counter()
    bench = build(args.preset, args.batch, args.seq_len, dtype=args.dtype, steps=args.warmup + args.steps + 1)
    batches = bench.batches(4)
    state, bench.state = bench.state, None
    with sharding.use_mesh(bench.mesh):
        compiled = bench.step_fn.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        times, losses = time_steps(compiled, state, batches, args.warmup, args.steps)
    del state
    return dict(ran=True, build_and_compile_s=compile_s, step_s=stats(times), step_times_s=times,
                loss_first=losses[0], loss_last=losses[-1],
                compute_dtype=str(np.dtype(step_lib.compute_dtype(args.dtype))))


# ----------------------------------------------------------------------------------------------------------
# transformers (in a child process: `--torch-child '<json>'`).
# ----------------------------------------------------------------------------------------------------------
def torch_side(spec: dict) -> dict:
    """The transformers train step, timed; `spec` holds preset, batch, seq_len, steps, warmup, dtype, compile."""
    import torch
    import transformers

    dims = model_dims(spec["preset"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = spec["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**llama_config(dims, spec["seq_len"]))
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)  # noqa: SLF001
    model.float()  # float32 weights (and so AdamW state), as clt's params
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.1),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    try:
        opt, fused = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True), True
    except (RuntimeError, TypeError, ValueError):
        opt, fused = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True), False
    fwd = torch.compile(model) if spec["compile"] else model
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, dims.vocab_size, (spec["batch"], spec["seq_len"] + 1), generator=gen).to(device)
               for _ in range(4)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def train_step(tokens):
        with autocast:
            logits = fwd(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    losses = [float(train_step(batches[0]))]  # the first step compiles
    sync()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, 1 + spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        loss = train_step(batches[i % len(batches)])
        sync()
        if i > spec["warmup"]:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    return dict(ran=True, step_s=stats(times), step_times_s=times, first_step_s=compile_s,
                loss_first=losses[0], loss_last=losses[-1], dtype=dtype,
                autocast_bf16=dtype == "bfloat16", compiled=spec["compile"], fused_adamw=fused,
                attn_implementation=model.config._attn_implementation,  # noqa: SLF001
                params=sum(p.numel() for p in params), device=torch.cuda.get_device_name() if cuda else "cpu",
                threads=torch.get_num_threads(), versions=dict(torch=torch.__version__,
                                                               transformers=transformers.__version__))


def run_torch(args: argparse.Namespace) -> dict:
    spec = dict(preset=args.preset, batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                dtype=args.dtype, compile=args.compile)
    proc = subprocess.run([sys.executable, __file__, "--torch-child", json.dumps(spec)], capture_output=True,
                          text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(ran=False, why=f"the transformers child exited {proc.returncode}: {err}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------
# MaxText (a subprocess of --maxtext-python).
# ----------------------------------------------------------------------------------------------------------
def maxtext_probe(python: str) -> tuple[dict | None, str | None]:
    """({version, python, package dir}, None) when `python` finds maxtext's train module, else (None, why)."""
    code = ("import importlib.util, importlib.metadata, json, os, platform, sys\n"
            f"spec = importlib.util.find_spec({MAXTEXT_MODULE.split('.')[0]!r})\n"
            "info = dict(python=platform.python_version())\n"
            "if spec is None: print(json.dumps(info)); sys.exit(0)\n"
            "info.update(version=importlib.metadata.version('maxtext'), dir=os.path.dirname(spec.origin),\n"
            f"            train=importlib.util.find_spec({MAXTEXT_MODULE!r}) is not None)\n"
            "print(json.dumps(info))\n")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"--maxtext-python {python} could not be run: {e}"
    if proc.returncode:
        return None, f"--maxtext-python {python} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if "version" not in info:
        return None, (f"maxtext is not installed for {python} (Python {info['python']}); maxtext on PyPI requires "
                      "Python >= 3.12: pass --maxtext-python with a 3.12 interpreter where `pip install maxtext` "
                      "(and its train dependencies) is done")
    if not info.get("train"):
        return None, f"maxtext {info['version']} for {python} has no module {MAXTEXT_MODULE}"
    return info, None


def maxtext_overrides(args: argparse.Namespace, dims: ModelDims, backend: str, n_devices: int, out: str) -> list[str]:
    """MaxText's key=value overrides for clt's shape, optimizer and dtype (its base.yml holds the rest)."""
    if args.batch % n_devices:
        raise ValueError(f"--batch {args.batch} does not divide over {n_devices} devices")
    attention = args.maxtext_attention
    if attention == "auto":
        attention = "cudnn_flash_jax" if backend == "gpu" else "dot_product"
    dtype = str(np.dtype(step_lib.compute_dtype(args.dtype)))
    return [f"{k}={v}" for k, v in dict(
        run_name="peers", base_output_directory=out, hardware="gpu" if backend == "gpu" else "cpu",
        skip_jax_distributed_system="true", dataset_type="synthetic", steps=args.warmup + args.steps + 1,
        enable_checkpointing="false", enable_tensorboard="false", enable_goodput_recording="false",
        monitor_goodput="false", gcs_metrics="false", save_config_to_gcs="false",
        base_emb_dim=dims.d_model, base_num_query_heads=dims.n_heads, base_num_kv_heads=dims.n_kv_heads,
        base_mlp_dim=dims.d_ff, base_num_decoder_layers=dims.n_layers, head_dim=dims.head_dim,
        vocab_size=dims.vocab_size, logits_via_embedding=str(dims.tie_embeddings).lower(),
        normalization_layer_epsilon=dims.norm_eps, rope_max_timescale=int(dims.rope_theta),
        per_device_batch_size=args.batch // n_devices, max_target_length=args.seq_len,
        dtype=dtype, weight_dtype="float32", attention=attention, remat_policy=args.maxtext_remat,
        enable_dropout="false", opt_type="adamw", learning_rate=1e-3, adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8,
        adam_weight_decay=0.1, gradient_clipping_threshold=1.0, ici_data_parallelism=n_devices,
        ici_fsdp_parallelism=1).items()]


def parse_maxtext_log(text: str) -> list[tuple[int, float, float | None]]:
    """(step, seconds, TFLOP/s/device) of each "completed step" line of MaxText's log."""
    return [(int(m[1]), float(m[2]), float(m[3]) if m[3] else None) for m in MAXTEXT_STEP.finditer(text)]


def run_maxtext(args: argparse.Namespace, dims: ModelDims, backend: str, n_devices: int) -> dict:
    if args.no_maxtext:
        return dict(ran=False, why="skipped (--no-maxtext)")
    info, why = maxtext_probe(args.maxtext_python)
    if info is None:
        return dict(ran=False, why=why)
    with tempfile.TemporaryDirectory(prefix="clt-peers-maxtext-") as out:
        overrides = maxtext_overrides(args, dims, backend, n_devices, out)
        cmd = [args.maxtext_python, "-m", MAXTEXT_MODULE, os.path.join(info["dir"], "configs", "base.yml"),
               *overrides]
        env = dict(os.environ)
        if backend == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=MAXTEXT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return dict(ran=False, why=f"MaxText did not finish in {MAXTEXT_TIMEOUT_S} s", command=cmd)
        wall_s = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    steps = parse_maxtext_log(log)
    timed = [(s, sec, tf) for s, sec, tf in steps if s > args.warmup]
    if proc.returncode or len(timed) < 1:
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return dict(ran=False, why=f"MaxText exited {proc.returncode} with {len(steps)} step lines: {tail[0]}",
                    command=cmd, version=info["version"], python=info["python"])
    secs = [sec for _, sec, _ in timed]
    tflops = [tf for _, _, tf in timed if tf is not None]
    return dict(ran=True, version=info["version"], python=info["python"], command=cmd, wall_s=wall_s,
                step_s=dict(stats(secs), used="mean"), step_times_s=secs,
                maxtext_tflops_per_device=statistics.median(tflops) if tflops else None,
                first_steps_s=[sec for s, sec, _ in steps if s <= args.warmup])


# ----------------------------------------------------------------------------------------------------------
# All three.
# ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    load_start = list(os.getloadavg())
    import jax

    backend, n_devices = jax.default_backend(), jax.device_count()  # initialises JAX's backend: see the note
    dims = model_dims(args.preset)
    maxtext = run_maxtext(args, dims, backend, n_devices)
    torch_r = dict(ran=False, why="skipped (--no-transformers)") if args.no_transformers else run_torch(args)
    machine = machine_info()
    machine["loadavg_start"] = load_start
    clt_r = run_clt(args)
    machine["loadavg_end"] = list(os.getloadavg())
    tokens = args.batch * args.seq_len
    kind = machine["device_kind"]
    sides = dict(clt=clt_r, transformers=torch_r, maxtext=maxtext)
    for r in sides.values():
        if r.get("ran"):
            s = r["step_s"][r["step_s"].get("used", "median")]
            r.update(throughput(s, tokens, dims, args.seq_len, kind, n_devices))
    ratios = {f"clt_over_{name}": clt_r["tokens_per_s"] / r["tokens_per_s"]
              for name, r in sides.items() if name != "clt" and r.get("ran")}
    return dict(
        benchmark="peers", command=command_line(), machine=machine,
        config=dict(preset=args.preset, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                    steps=args.steps, warmup=args.warmup, quick=args.quick, compile=args.compile,
                    vocab=dims.vocab_size),
        params=param_count(dims), dims=dict(vars(dims)), tokens_per_step=tokens,
        flops_per_token=flops_per_token(dims, args.seq_len), ratios=ratios, **sides)


def summary(r: dict) -> str:
    c = r["config"]
    parts = [f"peers {c['preset']} ({r['params'] / 1e6:.2f}M) {c['batch']}x{c['seq_len']} on "
             f"{r['machine']['device_count']}x {r['machine']['device_kind']}"]
    for name in ("clt", "transformers", "maxtext"):
        s = r[name]
        if s.get("ran"):
            mfu = f"MFU {s['mfu']:.1%}" if s["mfu"] is not None else "MFU n/a"
            which = s["step_s"].get("used", "median")
            parts.append(f"{name} {s['step_s'][which] * 1e3:.1f} ms/step ({which}) {s['tokens_per_s'] / 1e3:.2f}k tok/s "
                         f"{mfu}")
        else:
            parts.append(f"{name} not run: {s['why']}")
    parts.append(", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()) or "no ratios")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.torch_child:
        print(json.dumps(torch_side(json.loads(args.torch_child))))
        return
    try:
        result = run(args)
    except (ConfigError, ValueError) as e:  # a shape the model, the mesh or a peer rejects: one line
        print(f"peers.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(result), file=sys.stderr)
    path = record(result, args.out, "peers")
    print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to the peers until clt runs
    main()
