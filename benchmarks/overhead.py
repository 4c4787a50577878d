"""clt's overhead: `clt train`'s steady-state step time over a bare, hand-rolled jitted step of the same model.

    python benchmarks/overhead.py [--quick] [--preset 1b] [--batch 8] [--seq-len 2048] [--steps 100]
        [--every 10] [--rounds 2] [--dtype auto|float32|bfloat16] [--out FILE.jsonl]

Two sides, in one process, on the same model shape, batch, seq_len, dtype and mesh (all local devices on the
data axis, as `clt train`'s default mesh):

- bare: the model's train step as a minimal `jax.jit` function: clt's `Transformer` forward, next-token
  cross-entropy (mean over tokens, float32 log-softmax), `jax.value_and_grad`, and plain optax
  `clip_by_global_norm` + `adamw` with clt's default hyperparameters (b1, b2, eps, weight decay on matrices
  only, clip) and a constant LR; no clt loop, no data pipeline, no spike guard, no injected LR, no metrics
  but the loss. Its params and optimizer state have the same shardings as `clt train`'s (built by
  benchmarks/step.py's `build`, which builds them exactly as `clt train` does), the step donates them, and it is
  fed random batches placed on the devices beforehand.
- clt: the real loop, `clt.train.train(cfg, workdir)`, on tiny data prepared here with clt's own `prepare_text`
  (a few standard-library sources, byte tokenizer: vocabulary 257 padded to 384, the bare side's too), one
  phase of `--steps` steps at a constant LR, evaluation only where the plan forces it (steps 0 and the end,
  on 8 sequences), one checkpoint at the end, a train row every `--every` steps. Its seconds per step are read
  from the workdir's metrics.jsonl train rows: `step_s` where the loop writes it (seconds per train step in
  that log interval), else batch * seq_len / `tokens_per_s`.

Both sides are measured the same way: a log interval of `--every` steps is timed from the end of the previous
one to the host fetch of its last loss (the loop's one sync per interval), so asynchronous dispatch overlaps
steps on both; the first interval (the step after the compile and its warm-up) is dropped on both, and the
median over the remaining intervals is each side's seconds per step. `overhead_ratio` = clt's median / the
bare median (target <= 1.03).

Order: the bare side runs first, then clt's. A shared machine drifts (other work, thermal state), so with
`--rounds 2` (the default) the order is mirrored in a second round (bare, clt, clt, bare: ABBA), which cancels a
drift that is linear in time; the ratio pools every round's intervals. `--rounds 1` is the plain bare-then-clt
order. The per-round ratios are reported as well: their spread is the noise of the measurement.
`--quick`: the demo preset at batch 8 x 128, 30 steps, 2 rounds (about a minute on 2 CPU cores).
Each run prints one JSON line and appends it to benchmarks/results/overhead.jsonl (or --out).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import statistics
import sys
import sysconfig
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from step import BYTE_VOCAB, build, command_line, machine_info, record, stats  # benchmarks/ is sys.path[0]

from clt import config, sharding, step as step_lib  # noqa: E402
from clt.config import ConfigError
from clt.metrics import read_jsonl
from clt.model import PRESETS, Transformer

LR = 1e-3  # the constant LR of both sides (build's plan uses the same)
QUICK = dict(preset="demo", batch=8, seq_len=128, steps=30, every=5, rounds=2)
DEFAULTS = dict(preset="1b", batch=8, seq_len=2048, steps=100, every=10, rounds=2)
DATA_BYTES = 400_000  # of standard-library sources: enough rows that the demo run never repeats an epoch


# ----------------------------------------------------------------------------------------------------------
# Arguments.
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; --quick fills in the sizes not given. Bad values exit 2 with one line (argparse's error)."""
    p = argparse.ArgumentParser(prog="overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small CPU run: {QUICK}")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"model preset (default {DEFAULTS['preset']})")
    p.add_argument("--batch", type=int, help=f"global batch in sequences (default {DEFAULTS['batch']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    p.add_argument("--steps", type=int, help=f"train steps per side and round (default {DEFAULTS['steps']})")
    p.add_argument("--every", type=int, help=f"steps per log interval, clt's log.every (default {DEFAULTS['every']})")
    p.add_argument("--rounds", type=int, help="1: bare then clt; 2: bare, clt, clt, bare (default 2)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--out", help="JSONL file to append the result to (default benchmarks/results/overhead.jsonl)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if min(args.batch, args.seq_len, args.every, args.rounds) < 1:
        p.error("--batch, --seq-len, --every and --rounds must be >= 1")
    if args.rounds > 2:
        p.error("--rounds must be 1 or 2")
    if args.steps < 3 * args.every:
        p.error(f"--steps {args.steps} must be at least 3 x --every ({3 * args.every}): the first interval is "
                "dropped and a median needs at least two more")
    if args.steps % args.every:
        p.error(f"--steps {args.steps} must be a multiple of --every {args.every} (whole log intervals)")
    return args


def order(rounds: int) -> list[str]:
    """The sides in the order they run: one round is bare then clt; the second mirrors it (ABBA)."""
    return ["bare", "clt", "clt", "bare"][:2 * rounds]


# ----------------------------------------------------------------------------------------------------------
# The bare side.
# ----------------------------------------------------------------------------------------------------------
def bare_optimizer(optim: config.OptimConfig) -> optax.GradientTransformation:
    """Plain optax AdamW with clt's hyperparameters and clipping, a constant LR, matrices decayed only."""
    return optax.chain(optax.clip_by_global_norm(optim.clip) if optim.clip else optax.identity(),
                       optax.adamw(LR, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                                   mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)))


def bare_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params_sh: Any, opt_sh: Any,
                 batch_sh: Any, repl: Any):
    """forward + cross-entropy + grad + AdamW, jitted with the shardings given and params/opt state donated."""

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, in_shardings=(params_sh, opt_sh, batch_sh), out_shardings=(params_sh, opt_sh, repl),
                   donate_argnums=(0, 1))


def interval_times(run_step, steps: int, every: int) -> list[dict]:
    """Run `steps` steps (index 0 first: compile and warm-up), timing each log interval as clt's loop does:
    the clock restarts after step 0 and after each interval's host fetch; one row per interval ending at
    `done` % every == 0, with the steps it holds."""
    rows, t0, n = [], None, 0
    for at in range(steps):
        loss = run_step(at)
        n += 1
        if at == 0:
            jax.block_until_ready(loss)
            t0, n = time.perf_counter(), 0
        done = at + 1
        if done % every == 0:
            value = float(jax.device_get(loss))  # the loop's one host sync per interval
            dt = time.perf_counter() - t0
            rows.append(dict(step=at, steps=n, seconds=dt, step_s=dt / n, loss=value))
            t0, n = time.perf_counter(), 0
    return rows


def run_bare(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    bench = build(args.preset, args.batch, args.seq_len, dtype=args.dtype, steps=args.steps)
    graphdef = _graphdef_of(bench, args.dtype)
    params = bench.state.params
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    tx = bare_optimizer(bench.cfg.optim)
    opt_sh = sharding.shardings_of(bench.mesh, jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    fn = bare_step_fn(graphdef, tx, params_sh, opt_sh, bench.batch_sh, sharding.replicated(bench.mesh))
    batches = bench.batches(4)
    bench.state = None  # the step owns (and donates) the params from here
    holder = dict(params=params, opt=opt_state)
    del params, opt_state

    def run_step(at: int):
        holder["params"], holder["opt"], loss = fn(holder["params"], holder["opt"], batches[at % len(batches)])
        return loss

    with sharding.use_mesh(bench.mesh):
        setup_s = time.perf_counter() - t0
        rows = interval_times(run_step, args.steps, args.every)
    holder.clear()
    return dict(setup_s=setup_s, rows=rows)


def _graphdef_of(bench, dtype: str) -> nnx.GraphDef:
    """The structure of the model `build` made (built abstractly with the same options, as clt's create_model)."""
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(bench.dims, dtype=step_lib.compute_dtype(dtype),
                                                           attention=bench.attention, rngs=nnx.Rngs(0))))


# ----------------------------------------------------------------------------------------------------------
# The clt side.
# ----------------------------------------------------------------------------------------------------------
def prepare_data(root: pathlib.Path) -> pathlib.Path:
    """A small text domain prepared by clt itself: standard-library sources, byte tokenizer."""
    from clt.data.prepare import prepare_text

    src = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, size = [], 0
    for path in sorted(src.glob("*.py")):
        files.append(str(path))
        size += path.stat().st_size
        if size >= DATA_BYTES:
            break
    out = root / "data" / "text"
    prepare_text(files, domain="text", tokenizer="byte", out=str(out), progress=False)
    return out


def clt_config(args: argparse.Namespace, data: pathlib.Path) -> config.Config:
    """One phase of --steps at a constant LR: evals only at 0 and the end, one checkpoint (the phase end)."""
    return config.from_dict(dict(
        model=dict(preset=args.preset, dtype=args.dtype),
        data=dict(domains={"text": str(data)}, seq_len=args.seq_len, eval_sequences=8, eval_batch=8),
        batch_size=args.batch, seed=0,
        phases=(dict(name="p", steps=args.steps, mixture={"text": 1.0}, schedule=dict(kind="constant", peak=LR)),),
        monitor=dict(every=args.steps + 1), checkpoint=dict(every=0), log=dict(every=args.every)))


def step_seconds(rows: list[dict], tokens_per_step: int) -> list[dict]:
    """The train rows' seconds per step, first row dropped: `step_s` when the loop wrote it, else derived from
    `tokens_per_s`. Eval rows (no `loss`/`lr`) are skipped."""
    train = [r for r in rows if "lr" in r and ("step_s" in r or "tokens_per_s" in r)]
    out = []
    for r in train[1:]:
        s = r["step_s"] if "step_s" in r else tokens_per_step / r["tokens_per_s"]
        out.append(dict(step=r["step"], step_s=s, source="step_s" if "step_s" in r else "tokens_per_s",
                        tokens_per_s=r.get("tokens_per_s"), loss=r.get("loss")))
    return out


def run_clt(args: argparse.Namespace, data: pathlib.Path, workdir: pathlib.Path) -> dict:
    from clt import train

    cfg = clt_config(args, data)
    t0 = time.perf_counter()
    train.train(cfg, str(workdir), progress=False)
    wall_s = time.perf_counter() - t0
    rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "lr" in r]
    return dict(wall_s=wall_s, train_rows=rows, used=step_seconds(rows, args.batch * args.seq_len))


# ----------------------------------------------------------------------------------------------------------
# Both, and the ratio.
# ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    machine = machine_info()
    sides: dict[str, list] = dict(bare=[], clt=[])
    with tempfile.TemporaryDirectory(prefix="clt-overhead-") as tmp:
        root = pathlib.Path(tmp)
        data = prepare_data(root)
        for i, side in enumerate(order(args.rounds)):
            if side == "bare":
                r = run_bare(args)
                sides["bare"].append(dict(position=i, setup_s=r["setup_s"], rows=r["rows"][1:],
                                          dropped=r["rows"][:1]))
            else:
                r = run_clt(args, data, root / f"run{i}")
                sides["clt"].append(dict(position=i, wall_s=r["wall_s"], rows=r["used"],
                                         train_rows=r["train_rows"]))
            gc.collect()
    bare = [row["step_s"] for s in sides["bare"] for row in s["rows"]]
    clt = [row["step_s"] for s in sides["clt"] for row in s["rows"]]
    bare_s, clt_s = stats(bare), stats(clt)
    per_round = [statistics.median(r["step_s"] for r in c["rows"]) / statistics.median(r["step_s"] for r in b["rows"])
                 for b, c in zip(sides["bare"], sides["clt"])]
    sources = sorted({row["source"] for s in sides["clt"] for row in s["rows"]})
    machine["loadavg_end"] = list(os.getloadavg())
    return dict(
        benchmark="overhead", command=command_line(), machine=machine, commit=_commit(),
        config=dict(preset=args.preset, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                    compute_dtype=str(np.dtype(step_lib.compute_dtype(args.dtype))), steps=args.steps,
                    every=args.every, rounds=args.rounds, order=order(args.rounds), quick=args.quick,
                    vocab=BYTE_VOCAB),
        overhead_ratio=clt_s["median"] / bare_s["median"], ratio_per_round=per_round, target=1.03,
        bare_step_s=bare_s, clt_step_s=clt_s, clt_source=sources,
        tokens_per_s=dict(bare=args.batch * args.seq_len / bare_s["median"],
                          clt=args.batch * args.seq_len / clt_s["median"]),
        bare=sides["bare"], clt=sides["clt"])


def _commit() -> str | None:
    """The checkout's commit (and whether it had changes): which loop the clt side measured."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../clt"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def summary(r: dict) -> str:
    c, b, k = r["config"], r["bare_step_s"], r["clt_step_s"]
    return (f"overhead {c['preset']} {c['batch']}x{c['seq_len']} {c['compute_dtype']} on "
            f"{r['machine']['device_count']}x {r['machine']['device_kind']}, order {'-'.join(c['order'])}: "
            f"bare {b['median'] * 1e3:.1f} ms/step (min {b['min'] * 1e3:.1f}, max {b['max'] * 1e3:.1f}, n {b['n']}) | "
            f"clt {k['median'] * 1e3:.1f} ms/step (min {k['min'] * 1e3:.1f}, max {k['max'] * 1e3:.1f}, n {k['n']}) | "
            f"overhead_ratio {r['overhead_ratio']:.3f} (per round "
            f"{', '.join(f'{x:.3f}' for x in r['ratio_per_round'])}; target <= {r['target']})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except ConfigError as e:  # a shape the model or the mesh rejects: one line naming the field
        print(f"overhead.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(result), file=sys.stderr)
    path = record(result, args.out, "overhead")
    print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
