"""The training loop: walk a phase plan on a device mesh, evaluating, logging and checkpointing.

`train()` reads top to bottom in banner-marked sections (big_vision style); the pieces a test needs to reach
(the step, state creation, the optimizer policy at a switch) are module-level functions. Everything that
changes over training is computed from the plan and the global step; the state holds only params, optimizer
moments, the step and the loss statistics used to skip spikes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clt import checkpoint as ckpt_lib
from clt import monitor, replay, sharding
from clt.config import Config, ConfigError, OptimConfig
from clt.data.pipeline import BatchSource, device_prefetch, iterate
from clt.data.shards import DomainData
from clt.data.tokenizer import load_tokenizer
from clt.evaluate import (evaluate, evaluate_task, load_choice_task, load_eval_sets, make_eval_step,
                          make_score_step)
from clt.loss import token_nll
from clt.metrics import JsonlWriter, TensorBoardSink, read_jsonl, truncate_from
from clt.model import ModelDims, flops_per_token, param_count, resolve_dims
from clt.optim import make_optimizer, with_lr
from clt.plan import Plan, resolve
from clt.schedule import lr_at

log = logging.getLogger("clt")

# Dense bf16 peak FLOP/s per device, for MFU; devices not listed get no MFU (e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}

SPIKE_WARMUP = 20  # good steps before the running mean is trusted to flag spikes


class StopRun(RuntimeError):
    """The run stopped itself (repeated skipped updates, an alert with on_alert="stop")."""


# ----------------------------------------------------------------------------------------------------------
# The train state and the step.
# ----------------------------------------------------------------------------------------------------------
def new_state(params: nnx.State, tx: optax.GradientTransformation) -> dict:
    return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                loss_ema=jnp.zeros((), jnp.float32), good=jnp.zeros((), jnp.int32), skips=jnp.zeros((), jnp.int32))


def train_step(state: dict, tokens: jax.Array, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               plan: Plan, optim: OptimConfig) -> tuple[dict, dict]:
    """One update. The LR is `lr_at(plan, step)` written into the injected hyperparameters; a non-finite or
    spiking loss leaves params and moments untouched (the step still advances: its rows are consumed)."""
    params = state["params"]

    def loss_fn(p, tok):
        nll, logz = token_nll(nnx.merge(graphdef, p)(tok[:, :-1]), tok[:, 1:])
        loss = nll.mean()
        return loss + optim.z_loss * jnp.mean(logz ** 2), loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    A = optim.grad_accum
    if A == 1:
        (_, loss), grads = grad_fn(params, tokens)
    else:
        # Micro-batch i takes rows i, i + A, ...: each device keeps its own rows in every micro-batch.
        micro = tokens.reshape(tokens.shape[0] // A, A, -1).swapaxes(0, 1)

        def body(carry, tok):
            g_sum, l_sum = carry
            (_, l), g = grad_fn(params, tok)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g_sum, l_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
        grads, loss = jax.tree.map(lambda g: g / A, g_sum), l_sum / A

    grad_norm = optax.tree.norm(grads)
    lr = lr_at(plan, state["step"])
    updates, opt_state = tx.update(grads, with_lr(state["opt_state"], lr), params)
    new_params = optax.apply_updates(params, updates)

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim.spike_factor:
        ok &= ~((state["good"] >= SPIKE_WARMUP) & (loss > optim.spike_factor * state["loss_ema"]))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    ema = jnp.where(state["good"] == 0, loss, 0.98 * state["loss_ema"] + 0.02 * loss)
    new_state_ = dict(params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                      step=state["step"] + 1, loss_ema=jnp.where(ok, ema, state["loss_ema"]),
                      good=state["good"] + ok.astype(jnp.int32),
                      skips=jnp.where(ok, 0, state["skips"] + 1).astype(jnp.int32))
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr, skipped=~ok)
    return new_state_, metrics


def state_layout(dims: ModelDims, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation, *, seed: int,
                 **model_kwargs: Any) -> tuple[nnx.GraphDef, nnx.State, dict, dict]:
    """(graphdef, params, abstract train state, its shardings): the model created into its shards and the
    layout every checkpoint restore and the jitted step use."""
    graphdef, params = nnx.split(sharding.create_model(dims, mesh, seed=seed, **model_kwargs))
    abstract = jax.eval_shape(functools.partial(new_state, tx=tx), params)
    return graphdef, params, abstract, sharding.shardings_of(mesh, abstract)


def init_state(params: nnx.State, tx: optax.GradientTransformation, state_sh: dict) -> dict:
    """A fresh train state (step 0, new optimizer) around `params`, created directly into its shardings."""
    return jax.jit(functools.partial(new_state, tx=tx), out_shardings=state_sh)(params)


def compile_step(graphdef, tx, plan: Plan, optim: OptimConfig, state_sh, batch_sh, repl) -> Callable:
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, plan=plan, optim=optim)
    return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)


def reset_optimizer(state: dict, tx: optax.GradientTransformation, state_sh: dict) -> dict:
    """The `reset` policy at a phase switch: a fresh optimizer state (moments and bias-correction count)."""
    opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(state["params"])
    return {**state, "opt_state": opt_state}


# ----------------------------------------------------------------------------------------------------------
# Setup helpers.
# ----------------------------------------------------------------------------------------------------------
def load_domains(cfg: Config) -> dict[str, DomainData]:
    """The declared domains whose prepared data exists (a domain only past phases used may be deleted)."""
    data = {name: DomainData(path) for name, path in cfg.data.domains if pathlib.Path(path).exists()}
    if not data:
        name, path = cfg.data.domains[0]
        DomainData(path)  # raises the ShardError that says to run `clt prepare`
    tokenizers = {d.tokenizer for d in data.values()}
    if len(tokenizers) > 1:
        raise ConfigError("data.domains", dict(cfg.data.domains), f"domains use different tokenizers {tokenizers}",
                          "prepare every domain with the same --tokenizer")
    return data


def check_data_needed(plan: Plan, data: dict[str, DomainData], start: int, cfg: Config) -> None:
    """Every domain a phase from `start` on draws from (fresh, replay or upsampling) must have its data."""
    paths = dict(cfg.data.domains)
    for p in plan.phases:
        if p.end <= start:
            continue
        weights = [p.mixture, p.replay_weights if p.replay_source == "mixture" else (), p.upsample_mixture or ()]
        for w in weights:
            for d, x in zip(plan.domains, w):
                if x > 0 and d not in data:
                    DomainData(paths[d])  # raises: no prepared domain at PATH, run `clt prepare`


def model_dims(cfg: Config, data: dict[str, DomainData]) -> ModelDims:
    data_vocab = max(d.vocab_size for d in data.values())
    if cfg.model.vocab_size and cfg.model.vocab_size < data_vocab:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size, f"smaller than the data's vocabulary {data_vocab}",
                          "raise it or set 0 to follow the data")
    # Pad the vocabulary to a multiple of 128: shards evenly over tensor axes and keeps matmuls aligned.
    return resolve_dims(cfg.model, -(-data_vocab // 128) * 128)


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def data_manifest(cfg: Config, data: dict[str, DomainData]) -> dict[str, str]:
    return {name: data[name].manifest_hash() for name, _ in cfg.data.domains if name in data}


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0 (preemption-safe)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, at_boundary: bool) -> bool:
        """Whether to stop now. One process: as soon as asked. Several: only at log boundaries, where every
        host contributes its flag, so all stop after the same step."""
        if jax.process_count() == 1:
            return self.requested
        if not at_boundary:
            return False
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _kept_on_resume(resumed: int, row: dict) -> bool:
    """Rows at or after the resumed step that a resume keeps: the run's own history, and what was written at
    the resumed step before its checkpoint was saved (the checkpoint event, a branch's release), which the
    resumed run does not redo."""
    if row.get("event") in ("preempted", "resume", "stopped", "init_from"):
        return True
    return row.get("step") == resumed and (row.get("event") in ("checkpoint", "release")
                                           or any(k.startswith("release/") for k in row))


def _log_line(step: int, total: int, phase: str, row: dict) -> str:
    s = f"step {step:>6}/{total} | {phase:<10} | loss {row['loss']:.4f} | lr {row['lr']:.2e}"
    if "tokens_per_s" in row:
        s += f" | {row['tokens_per_s'] / 1e3:.1f}k tok/s"
    if "mfu" in row:
        s += f" | MFU {row['mfu']:.1%}"
    if row.get("skipped_total"):
        s += f" | skipped {row['skipped_total']}"
    return s


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------
def train(cfg: Config, workdir: str, *, init_from: str | None = None, accept_changed_past: bool = False,
          progress: bool = True) -> dict:
    """Train `cfg`'s plan in `workdir` (resuming from its checkpoints); returns the last log row."""
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if init_from:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from))

    # ---------------------------------------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(cfg.mesh)
    log.info("mesh %s over %d %s devices (%d processes)", dict(mesh.shape), mesh.size, jax.default_backend(),
             jax.process_count())

    # ---------------------------------------------------------------------------------------------- Data
    data = load_domains(cfg)
    manifest = data_manifest(cfg, data)
    store = ckpt_lib.CheckpointStore(wd / "checkpoints", cfg.checkpoint)
    latest = store.latest_step()
    plan = resolve(cfg)
    if latest is not None:  # resume: the plan that ran is the authority over the past
        resume_meta = store.meta(latest)
        ckpt_lib.check_init_from(resume_meta, cfg.model.init_from)
        plan = ckpt_lib.check_resume_plan(cfg, resume_meta, latest, manifest, accept_changed_past)
    # An infinite schedule's branch anneal: the state at the anneal's start is where the next phase continues.
    branch_points = {p.end - p.schedule.anneal: p for p in plan.phases
                     if p.schedule.kind == "infinite" and p.schedule.branch}
    store.keep_steps(tuple(p.end for p in plan.phases) + tuple(branch_points))
    check_data_needed(plan, data, latest or 0, cfg)
    source = BatchSource(plan, data, host=jax.process_index(), hosts=jax.process_count())
    eval_domains = tuple(d for d in plan.domains if d in data)
    eval_sets = load_eval_sets(data, eval_domains, plan.seq_len, cfg.data.eval_sequences, cfg.data.eval_batch)

    # Replay buffer: contents are a pure function of (seed, plan, step); tokens are materialised at phase
    # boundaries into <workdir>/replay/step-<s>/ (see replay.py). A loaded buffer is the replay source instead.
    buffer = replay.ReplayBuffer(wd / "replay", plan, cfg.replay_buffer.capacity, data) \
        if cfg.replay_buffer.capacity else None
    loaded = None
    if cfg.replay_buffer.load:
        loaded = replay.BufferSnapshot(cfg.replay_buffer.load)
        some = next(iter(data.values()))
        loaded.check_compatible(plan.seq_len, some.vocab_size, some.tokenizer)

    def before_phase(p) -> None:
        if buffer is not None and p.index > 0:
            if is_main:
                buffer.snapshot(p.start)  # materialise while the previous phase's data still exists
            if jax.process_count() > 1:  # the other hosts open what process 0 wrote
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"clt-replay-{p.start}")
        if p.replay_share > 0 and p.replay_source == "buffer":
            source.buffer = loaded if loaded is not None else buffer.snapshot(p.start)
            log.info("phase %s replays %.0f%% from the buffer (%d sequences, %s)", p.name, 100 * p.replay_share,
                     source.buffer.fill, source.buffer.composition())
    if is_main:
        (wd / "plan.json").write_text(json.dumps(dict(plan=plan.to_json(), digest=plan.digest(),
                                                      data=manifest, config=cfg.to_dict()), indent=1))

    # ---------------------------------------------------------------------------------------------- Model and optimizer
    dims = model_dims(cfg, data)
    eos = next(iter(data.values())).train.eos_id
    log.info("model: %s, %.2fM params; plan %s: %d steps", cfg.model.preset or "custom",
             param_count(dims) / 1e6, plan.digest(), plan.total_steps)
    tx = make_optimizer(cfg.optim)
    graphdef, params, abstract_state, state_sh = state_layout(
        dims, mesh, tx, seed=cfg.seed, dtype=compute_dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype), remat=cfg.model.remat, doc_mask=cfg.model.doc_mask, eos_id=eos)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    # ---------------------------------------------------------------------------------------------- Load a checkpoint
    # Priority: 1. resume this workdir's latest checkpoint; 2. init_from weights with a fresh optimizer at
    # step 0; 3. fresh initialisation from the seed.
    if latest is not None:
        latest, state = store.restore_latest(abstract_state, state_sh)
        log.info("resumed from step %d", latest)
        if is_main:  # rows past the restored step are written again by this run (before the files reopen)
            truncate_from(wd / "metrics.jsonl", latest, keep=functools.partial(_kept_on_resume, latest))
            truncate_from(wd / "events.jsonl", latest, keep=functools.partial(_kept_on_resume, latest))
    events = JsonlWriter(wd / "events.jsonl") if is_main else None

    def emit(event: dict) -> None:
        if events is not None:
            events.write(event)

    if latest is not None:
        emit(dict(event="resume", step=latest, time=time.time()))
    if latest is None:
        if cfg.model.init_from:
            params = ckpt_lib.load_init_weights(cfg.model.init_from, abstract_state["params"], state_sh["params"],
                                                cfg.checkpoint)
            emit(dict(event="init_from", step=0, source=cfg.model.init_from))
        state = init_state(params, tx, state_sh)
    start = int(state["step"])
    meta = dict(plan=plan.to_json(), digest=plan.digest(), data=manifest, init_from=cfg.model.init_from)

    # ---------------------------------------------------------------------------------------------- Update step and evals
    step_fn = compile_step(graphdef, tx, plan, cfg.optim, state_sh, batch_sh, repl)
    eval_fn = make_eval_step(graphdef)
    tokenizer = load_tokenizer(next(iter(data.values())).tokenizer)
    tasks = [load_choice_task(t, tokenizer, plan.seq_len, cfg.data.eval_batch) for t in cfg.monitor.tasks]
    score_fn = make_score_step(graphdef) if tasks else None
    eval_at = set(monitor.eval_steps(plan, cfg.monitor))
    put = lambda batch: jax.make_array_from_process_local_data(batch_sh, batch["tokens"])  # noqa: E731
    # Every host holds the whole eval set, so eval arrays are put as global values (not per-host slices).
    rows_sh = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    put_eval = lambda x: jax.device_put(x, batch_sh if x.ndim == 2 else rows_sh)  # noqa: E731
    fpt = flops_per_token(dims, plan.seq_len)
    peak = peak_flops()
    sinks = []  # process 0 writes the run's files
    if is_main:
        sinks.append(JsonlWriter(wd / "metrics.jsonl"))
        if cfg.log.tensorboard:
            sinks.append(TensorBoardSink(wd / "tb"))
    gap_monitor = monitor.GapMonitor(plan, cfg.monitor)
    if start > 0:  # the switches before the resume keep their baselines and their already-sent events
        gap_monitor.catch_up(read_jsonl(wd / "metrics.jsonl"))

    def write(row: dict) -> None:
        for sink in sinks:
            sink.write(row)

    def run_eval(step: int) -> dict:
        row = dict(step=step, phase=plan.phase_at(min(step, plan.total_steps - 1)).name,
                   **evaluate(eval_fn, state["params"], eval_sets, cfg.data.eval_batch, put_eval))
        for task in tasks:
            row.update(evaluate_task(score_fn, state["params"], task, cfg.data.eval_batch, put_eval))
        write(row)
        for event in gap_monitor.update(row):
            emit(event)
            if event["event"] == "alert":
                log.warning("ALERT %s", event["message"])
                if cfg.monitor.on_alert == "stop":
                    raise StopRun(event["message"])
        return row

    def release_and_rewind(p, state: dict) -> dict:
        """A branch anneal ends: keep its result as a release checkpoint (<workdir>/releases/<phase>/, evaluated
        as `release/eval/...`), and continue from the state saved at the anneal's start, at eta_const."""
        release = ckpt_lib.CheckpointStore(wd / "releases" / p.name, cfg.checkpoint)
        if not release.has(p.end):  # a run killed right after this save redoes it identically: keep the first
            release.save(p.end, state, meta=dict(meta, phase=p.name, release=True))
        release.close()
        scores = evaluate(eval_fn, state["params"], eval_sets, cfg.data.eval_batch, put_eval)
        write(dict(step=p.end, phase=p.name, **{f"release/{k}": v for k, v in scores.items()}))
        emit(dict(event="release", step=p.end, phase=p.name, path=f"releases/{p.name}"))  # workdir-relative
        store.wait()
        before = store.restore(p.end - p.schedule.anneal, abstract_state, state_sh)
        return {**before, "step": state["step"]}

    # ---------------------------------------------------------------------------------------------- Train loop
    total = plan.total_steps
    last_row: dict = {}
    pbar = None
    if progress and is_main:
        from tqdm import tqdm
        pbar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
    t_log, tokens_since = time.perf_counter(), 0
    stop_reason = None
    with sharding.use_mesh(mesh), Preemption() as preempt:
        batches = device_prefetch(iterate(source, start, total, cfg.data.prefetch, before_phase), put)
        for step, batch in batches:
            p = plan.phase_at(step)
            if step == p.start:
                emit(dict(event="phase_start", step=step, phase=p.name))
            if step == p.start and step > 0 and p.optimizer == "reset":
                state = reset_optimizer(state, tx, state_sh)
                log.info("phase %s: optimizer state reset", p.name)
            if step in eval_at:
                try:
                    run_eval(step)
                except StopRun as e:
                    stop_reason = str(e)
                    break

            state, m = step_fn(state, batch)
            tokens_since += p.batch_size * plan.seq_len
            done = step + 1
            if pbar is not None:
                pbar.update(1)

            log_now = done % cfg.log.every == 0 or done == total or done == p.end
            if log_now:
                m = jax.device_get(m)  # the loop's only host sync
                dt = time.perf_counter() - t_log
                interval = range(max((step // cfg.log.every) * cfg.log.every, p.start), done)
                row = dict(step=step, phase=p.name, loss=float(m["loss"]), lr=float(m["lr"]),
                           grad_norm=float(m["grad_norm"]), tokens_per_s=tokens_since / dt,
                           **source.row_counts(interval))
                skips = int(state["skips"])
                skipped_total = int(done - int(state["good"]))
                if skipped_total:
                    row["skipped_total"] = skipped_total
                if peak:
                    row["mfu"] = row["tokens_per_s"] * fpt / (peak * jax.device_count())
                write(row)
                last_row = row
                line = _log_line(step, total, p.name, row)
                if pbar is not None:
                    pbar.write(line)
                elif is_main:
                    log.info(line)
                t_log, tokens_since = time.perf_counter(), 0
                if skips >= cfg.optim.max_skips:
                    stop_reason = (f"{skips} consecutive updates skipped (non-finite or spiking loss) at step {step}; "
                                   "the checkpoint holds the last good state: lower the LR or inspect the data")
                    break

            if done == p.end and p.schedule.kind == "infinite" and p.schedule.branch:
                state = release_and_rewind(p, state)
            if done == p.end or done == total:
                if done == total:  # the final eval (other phase ends are evaluated as the next phase's baseline)
                    try:
                        run_eval(done)
                    except StopRun as e:
                        stop_reason = str(e)
                store.save(done, state, meta=dict(meta, phase=p.name), phase_end=True)
                emit(dict(event="checkpoint", step=done, kind="phase_end"))
                if stop_reason:
                    break
            elif store.due(done) or done in branch_points:
                store.save(done, state, meta=dict(meta, phase=p.name))
                emit(dict(event="checkpoint", step=done, kind="branch_point" if done in branch_points else "interval"))

            if cfg.debug.preempt_at_step == done:
                os.kill(os.getpid(), signal.SIGTERM)
            if preempt.agreed(at_boundary=log_now):
                if not store.has(done):
                    store.save(done, state, meta=dict(meta, phase=p.name))
                store.wait()
                msg = (f"preempted: saved step {done}; resume with the same command "
                       f"(clt train CONFIG --workdir {workdir})")
                log.warning(msg)
                emit(dict(event="preempted", step=done))
                stop_reason = "preempted"
                break

    if stop_reason and stop_reason != "preempted":
        done = int(state["step"])
        if not store.has(done):
            store.save(done, state, meta=dict(meta, phase=plan.phase_at(max(done - 1, 0)).name))
        emit(dict(event="stopped", step=done, reason=stop_reason))
    if buffer is not None and is_main and int(state["step"]) == total:
        buffer.snapshot(total)  # the final buffer, ready for `clt replay export`
    store.wait()
    store.close()
    if pbar is not None:
        pbar.close()
    for sink in sinks:
        sink.close()
    if events is not None:
        events.close()
    if stop_reason and stop_reason != "preempted":
        raise StopRun(stop_reason)
    return dict(last_row, stopped=stop_reason, final_step=int(state["step"]))
