"""The training loop: walk a phase plan on a device mesh, evaluating, logging and checkpointing.

`train()` reads top to bottom in banner-marked sections (big_vision style); the pieces a test needs to reach
(the step, state creation, the optimizer policy at a switch) are module-level functions. Everything that
changes over training is computed from the plan and the global step; the state holds only params, optimizer
moments, the step and the loss statistics used to skip spikes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clt import checkpoint as ckpt_lib
from clt import monitor, replay, resume, sharding
from clt.config import Config, ConfigError, OptimConfig
from clt.data.pipeline import BatchSource, check_sequences_fit, device_prefetch, iterate
from clt.data.shards import DomainData
from clt.data.tokenizer import load_tokenizer
from clt.evaluate import (evaluate, evaluate_task, load_choice_task, load_eval_sets, make_eval_step,
                          make_score_step)
from clt.loss import token_nll
from clt.metrics import JsonlWriter, TensorBoardSink, read_jsonl, write_atomic
from clt.model import ModelDims, flops_per_token, param_count, resolve_dims
from clt.optim import make_optimizer, with_lr
from clt.plan import Plan, resolve
from clt.schedule import lr_at

log = logging.getLogger("clt")

# Dense bf16 peak FLOP/s per device, for MFU; devices not listed get no MFU (e.g. CPU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}

SPIKE_WARMUP = 20  # good steps (since the last switch) before the running mean is trusted to flag spikes
EMA_DECAY = 0.98  # the loss running mean's decay per good step


class StopRun(RuntimeError):
    """The run stopped itself (repeated skipped updates, an alert with on_alert="stop")."""


# ----------------------------------------------------------------------------------------------------------
# The train state and the step.
# ----------------------------------------------------------------------------------------------------------
def new_state(params: nnx.State, tx: optax.GradientTransformation) -> dict:
    """params, opt_state, step; the spike guard's loss EMA and its count of good steps since the last switch;
    `skips` (consecutive skipped updates, which stop the run at max_skips) and `skipped` (all of them)."""
    zero = jnp.zeros((), jnp.int32)
    return dict(params=params, opt_state=tx.init(params), step=zero, loss_ema=jnp.zeros((), jnp.float32),
                ema_count=zero, skips=zero, skipped=zero)


def train_step(state: dict, tokens: jax.Array, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               plan: Plan, optim: OptimConfig) -> tuple[dict, dict]:
    """One update. The LR is `lr_at(plan, step)` written into the injected hyperparameters; a non-finite or
    spiking loss leaves params and moments untouched (the step still advances: its rows are consumed).

    The spike guard's statistics restart at every switch (phase start, blend, upsampling): a switch to a
    harder domain raises the loss by design (the stability gap clt measures), and a mean carried over from
    the old data would call that a spike, skip the updates and stop the run."""
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

    switches = np.array(sorted({s["step"] for s in plan.switches()}), np.int32)
    fresh = jnp.isin(state["step"], switches) if switches.size else jnp.bool_(False)
    count = jnp.where(fresh, 0, state["ema_count"])
    mean = jnp.where(fresh, 0.0, state["loss_ema"])
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if optim.spike_factor:
        ok &= ~((count >= SPIKE_WARMUP) & (loss > optim.spike_factor * mean))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    ema = jnp.where(count == 0, loss, EMA_DECAY * mean + (1 - EMA_DECAY) * loss)
    skipped = (~ok).astype(jnp.int32)
    new_state_ = dict(params=keep(new_params, params), opt_state=keep(opt_state, state["opt_state"]),
                      step=state["step"] + 1, loss_ema=jnp.where(ok, ema, mean),
                      ema_count=count + ok.astype(jnp.int32), skips=jnp.where(ok, 0, state["skips"] + 1),
                      skipped=state["skipped"] + skipped)
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr, skipped=~ok, skips=new_state_["skips"],
                   skipped_total=new_state_["skipped"], loss_ema=new_state_["loss_ema"])
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
    check_sequences_fit(data, cfg.data.seq_len)
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


_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "tie_embeddings")


def model_record(cfg: Config, dims: ModelDims) -> dict:
    """What a checkpoint records of the model: its shape fields decide whether a resume may restore it."""
    return dict(preset=cfg.model.preset, param_dtype=cfg.model.param_dtype,
                **{k: getattr(dims, k) for k in _SHAPE_FIELDS})


def check_model_unchanged(recorded: dict | None, current: dict, step: int) -> None:
    """A changed model shape on resume is a config error naming the field (not a damaged checkpoint)."""
    for k in ("param_dtype", *_SHAPE_FIELDS):
        if recorded and k in recorded and recorded[k] != current[k]:
            by_preset = recorded.get("preset") != current["preset"]
            field = "model.preset" if by_preset else f"model.{k}"
            raise ConfigError(field, current["preset"] if by_preset else current[k],
                              f"the checkpoint at step {step} holds a model with {k}={recorded[k]!r} "
                              f"(preset {recorded.get('preset')!r}), this config gives {current[k]!r}",
                              "restore the run's model fields, or train in a new --workdir")


def _log_line(step: int, total: int, phase: str, row: dict) -> str:
    s = f"step {step:>6}/{total} | {phase:<10} | loss {row['loss']:.4f} | lr {row['lr']:.2e}"
    if "tokens_per_s" in row:
        s += f" | {row['tokens_per_s'] / 1e3:.1f}k tok/s"
    if "mfu" in row:
        s += f" | MFU {row['mfu']:.1%}"
    if row.get("skipped_total"):
        s += f" | skipped updates {row['skipped_total']}"
    return s


def _eval_line(row: dict, seconds: float) -> str:
    losses = " · ".join(f"{k[5:-5]} {v:.3f}" for k, v in row.items() if k.startswith("eval/") and k.endswith("/loss"))
    return f"eval @ step {row['step']} ({row['phase']}, {seconds:.1f}s): {losses}"


def _switch_line(plan: Plan, switch: dict) -> str:
    p = next(q for q in plan.phases if q.name == switch["phase"])
    mix = lambda w: " ".join(f"{d}:{x:.2f}" for d, x in zip(plan.domains, w) if x > 0)  # noqa: E731
    if switch["kind"] == "upsample":
        return f"upsampling starts at step {switch['step']} ({p.name}): {mix(p.upsample_mixture)}"
    text = f"phase {p.name} starts at step {p.start} (to {p.end}): {mix(p.mixture)}"
    if p.replay_share:
        text += f", replay {p.replay_share:.0%} ({p.replay_source})"
    if switch["kind"] == "blend":
        text += f", blended over {p.blend_steps} steps"
    return text + f", LR {p.schedule.kind}, optimizer {p.optimizer}; spike-guard statistics restart"


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------
def train(cfg: Config, workdir: str, *, init_from: str | None = None, accept_changed_past: bool = False,
          progress: bool = True) -> dict:
    """Train `cfg`'s plan in `workdir` (resuming from its checkpoints); returns the last log row.

    Holds the workdir's lock for the whole run: a second `clt train` on the same workdir is refused."""
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if init_from:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from))
    lock = resume.WorkdirLock(wd).acquire() if jax.process_index() == 0 else None
    try:
        return _train(cfg, wd, accept_changed_past, progress)
    except BaseException:
        # Nothing half-written stays behind (a full disk, a crash in a save): the next run resumes from the last
        # complete checkpoint either way, and a leftover temporary folder only takes space the disk may lack.
        ckpt_lib.remove_partial_saves(wd / "checkpoints")
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, wd: pathlib.Path, accept_changed_past: bool, progress: bool) -> dict:
    is_main = jax.process_index() == 0
    plan = resolve(cfg)  # first: a config error must not wait for the devices, the data or the model
    # ---------------------------------------------------------------------------------------------- Data and mesh
    data = load_domains(cfg)
    manifest = data_manifest(cfg, data)
    dims = model_dims(cfg, data)
    sharding.check_layout(cfg, plan, jax.device_count(), dims.vocab_size)  # every divisibility, one line each
    eval_domains = tuple(d for d in plan.domains if d in data)  # also checks that seq_len fits each eval split
    eval_sets = load_eval_sets(data, eval_domains, plan.seq_len, cfg.data.eval_sequences, cfg.data.eval_batch)
    mesh = sharding.make_mesh(cfg.mesh)
    log.info("mesh %s over %d %s devices (%d processes)", dict(mesh.shape), mesh.size, jax.default_backend(),
             jax.process_count())
    sinks = []  # process 0 writes the run's files; optional sinks open first, so a missing package fails early
    if is_main and cfg.log.tensorboard:
        sinks.append(TensorBoardSink(wd / "tb"))

    # ---------------------------------------------------------------------------------------------- Model and optimizer
    eos = next(iter(data.values())).train.eos_id
    tx = make_optimizer(cfg.optim)
    graphdef, params, abstract_state, state_sh = state_layout(
        dims, mesh, tx, seed=cfg.seed, dtype=compute_dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype), remat=cfg.model.remat, doc_mask=cfg.model.doc_mask, eos_id=eos)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    model = model_record(cfg, dims)

    # ---------------------------------------------------------------------------------------------- Resume or start
    # Priority: 1. this workdir's newest good checkpoint (damaged ones go to quarantine); 2. init_from weights
    # with a fresh optimizer at step 0; 3. fresh initialisation from the seed.
    store = ckpt_lib.CheckpointStore(wd / "checkpoints", cfg.checkpoint)
    resumed: dict = {}

    def check_meta(meta: dict) -> None:  # the config checks of a candidate checkpoint, before its arrays load
        nonlocal plan
        ckpt_lib.check_init_from(meta, cfg.model.init_from)
        check_model_unchanged(meta.get("model"), model, meta["step"])
        plan = ckpt_lib.check_resume_plan(cfg, meta, meta["step"], manifest, accept_changed_past)

    quarantined_before = set(store.quarantined())
    if store.steps():
        latest, state, resumed = store.restore_latest(abstract_state, state_sh, check_meta)
    elif quarantined_before:
        raise ckpt_lib.NoUsableCheckpoint(
            f"{store.directory} holds no checkpoint but damaged ones in quarantine/ ({', '.join(sorted(quarantined_before))}); "
            "starting over would overwrite the run's history: inspect them, or train in a new --workdir")
    else:
        latest, state = None, None
    newly_quarantined = sorted(set(store.quarantined()) - quarantined_before)
    total = plan.total_steps
    start = latest or 0

    # An infinite schedule's branch anneal: the state at the anneal's start is where the next phase continues.
    branch_points = {p.end - p.schedule.anneal: p for p in plan.phases
                     if p.schedule.kind == "infinite" and p.schedule.branch}
    store.keep_steps(tuple(p.end for p in plan.phases) + tuple(branch_points))
    buffer = replay.ReplayBuffer(wd / "replay", plan, cfg.replay_buffer.capacity, data) \
        if cfg.replay_buffer.capacity else None
    if start == total:  # finished: a re-run changes nothing (it completes what a kill after the last save cut)
        if is_main:
            if buffer is not None:
                buffer.snapshot(total)
            if not any(e.get("event") == "finished" for e in read_jsonl(wd / "events.jsonl")):
                JsonlWriter(wd / "events.jsonl").write(dict(event="finished", step=total))
        store.close()
        return dict(stopped=None, final_step=total, already_finished=True)

    check_data_needed(plan, data, start, cfg)
    source = BatchSource(plan, data, host=jax.process_index(), hosts=jax.process_count())
    loaded = None
    if cfg.replay_buffer.load:
        loaded = replay.BufferSnapshot(cfg.replay_buffer.load)
        some = next(iter(data.values()))
        loaded.check_compatible(plan.seq_len, some.vocab_size, some.tokenizer)

    def before_phase(p) -> None:
        # Replay buffer: contents are a pure function of (seed, plan, step); tokens are materialised at phase
        # boundaries into <workdir>/replay/step-<s>/ (see replay.py). A loaded buffer is the replay source instead.
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

    # ---------------------------------------------------------------------------------------------- Run files
    # Keyed by step: rows this run writes again are dropped first, so the files read as one uninterrupted run.
    if is_main:
        resume.rewrite_run_files(wd, start)
        write_atomic(wd / "plan.json", json.dumps(dict(plan=plan.to_json(), digest=plan.digest(), data=manifest,
                                                        config=cfg.to_dict()), indent=1))
        sinks.insert(0, JsonlWriter(wd / "metrics.jsonl"))
    events = JsonlWriter(wd / "events.jsonl") if is_main else None

    def emit(event: dict) -> None:
        if events is not None:
            events.write(event)

    for name in newly_quarantined:
        emit(dict(event="quarantine", step=start, checkpoint=name, time=time.time()))
    if latest is not None:
        emit(dict(event="resume", step=latest, time=time.time()))
        log.info("resumed from the checkpoint at step %d of %d", latest, total)
        changes = resume.config_changes(resumed.get("config", {}), cfg.to_dict()) if "config" in resumed else {}
        if changes:
            emit(dict(event="config_change", step=latest, changes=changes, time=time.time()))
            log.info("settings changed since the checkpoint: %s",
                     ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    else:
        if cfg.model.init_from:
            params = ckpt_lib.load_init_weights(cfg.model.init_from, abstract_state["params"], state_sh["params"],
                                                cfg.checkpoint)
            emit(dict(event="init_from", step=0, source=cfg.model.init_from))
            log.info("initialised from %s (fresh optimizer, step 0)", cfg.model.init_from)
        state = init_state(params, tx, state_sh)
    log.info("model %s, %.2fM params; plan %s: %d phases, %d steps; workdir %s", cfg.model.preset or "custom",
             param_count(dims) / 1e6, plan.digest(), len(plan.phases), total, wd)
    meta = dict(plan=plan.to_json(), digest=plan.digest(), data=manifest, init_from=cfg.model.init_from,
                model=model, config=cfg.to_dict())

    # ---------------------------------------------------------------------------------------------- Update step and evals
    step_fn = compile_step(graphdef, tx, plan, cfg.optim, state_sh, batch_sh, repl)
    eval_fn = make_eval_step(graphdef)
    tokenizer = load_tokenizer(next(iter(data.values())).tokenizer)
    tasks = [load_choice_task(t, tokenizer, plan.seq_len, cfg.data.eval_batch) for t in cfg.monitor.tasks]
    score_fn = make_score_step(graphdef) if tasks else None
    eval_at = set(monitor.eval_steps(plan, cfg.monitor))
    switches = {s["step"]: s for s in plan.switches()}
    put = lambda batch: jax.make_array_from_process_local_data(batch_sh, batch["tokens"])  # noqa: E731
    # Every host holds the whole eval set, so eval arrays are put as global values (not per-host slices).
    rows_sh = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
    put_eval = lambda x: jax.device_put(x, batch_sh if x.ndim == 2 else rows_sh)  # noqa: E731
    fpt = flops_per_token(dims, plan.seq_len)
    peak = peak_flops()
    gap_monitor = monitor.GapMonitor(plan, cfg.monitor)
    if start > 0:  # the switches before the resume keep their baselines and their already-sent events
        gap_monitor.catch_up(read_jsonl(wd / "metrics.jsonl"))

    def write(row: dict) -> None:
        for sink in sinks:
            sink.write(row)

    def run_eval(step: int) -> dict:
        t0 = time.perf_counter()
        row = dict(step=step, phase=plan.phase_at(min(step, plan.total_steps - 1)).name,
                   **evaluate(eval_fn, state["params"], eval_sets, cfg.data.eval_batch, put_eval))
        for task in tasks:
            row.update(evaluate_task(score_fn, state["params"], task, cfg.data.eval_batch, put_eval))
        write(row)
        if is_main:
            log.info(_eval_line(row, time.perf_counter() - t0))
        for event in gap_monitor.update(row):
            emit(event)
            line = monitor.describe_event(event)
            if line and is_main:
                log.info(line)
            if event["event"] == "alert":
                log.warning("ALERT %s", event["message"])
                if cfg.monitor.on_alert == "stop":
                    raise StopRun(event["message"])
        return row

    def save(step: int, kind: str, phase: str) -> None:
        """Save the state. Scheduled saves are events of the run (written first, so a kill before the save
        completes drops the event with it on restart); preemption and stop saves are told by their own event."""
        if kind not in ("preemption", "stop"):
            emit(dict(event="checkpoint", step=step, kind=kind))
        try:
            store.save(step, state, meta=dict(meta, phase=phase), phase_end=kind == "phase_end")
        except ckpt_lib.NonFiniteState as e:
            raise StopRun(str(e)) from None
        if cfg.debug.kill_in_save and cfg.debug.kill_at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault tests: a kill while the save is being written
        if is_main:
            log.info("checkpoint %d (%s) saving to %s", step, kind.replace("_", " "), store.directory / str(step))

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
        log.info("release %s: annealed model saved to %s; continuing from step %d's state", p.name,
                 wd / "releases" / p.name, p.end - p.schedule.anneal)
        store.wait()
        before = store.restore(p.end - p.schedule.anneal, abstract_state, state_sh)
        return {**before, "step": state["step"]}

    # ---------------------------------------------------------------------------------------------- Train loop
    last_row: dict = {}
    pbar = None
    if progress and is_main and sys.stderr.isatty():  # a bar on a terminal; plain lines in logs (SLURM, tee)
        from tqdm import tqdm
        pbar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
    t_log, tokens_since = time.perf_counter(), 0
    stop_reason = None
    first = True
    from tqdm.contrib.logging import logging_redirect_tqdm
    redirect = logging_redirect_tqdm(loggers=[log]) if pbar is not None else contextlib.nullcontext()
    with sharding.use_mesh(mesh), Preemption() as preempt, redirect:
        batches = device_prefetch(iterate(source, start, total, cfg.data.prefetch, before_phase), put)
        try:
            for step, batch in batches:
                p = plan.phase_at(step)
                if step == p.start:
                    emit(dict(event="phase_start", step=step, phase=p.name))
                if step in switches or step == p.start:
                    log.info(_switch_line(plan, switches.get(step, dict(step=step, kind="phase", phase=p.name))))
                if step == p.start and step > 0 and p.optimizer == "reset":
                    state = reset_optimizer(state, tx, state_sh)
                    log.info("phase %s: optimizer state reset", p.name)
                if step in eval_at:
                    run_eval(step)

                if first:
                    log.info("compiling the train step (batch %d x %d tokens on %d devices)...", p.batch_size,
                             plan.seq_len, mesh.size)
                    t_compile = time.perf_counter()
                state, m = step_fn(state, batch)
                tokens_since += p.batch_size * plan.seq_len
                if first:  # the compile is the first minute of a run: say so, and keep it out of tokens/s
                    jax.block_until_ready(m["loss"])
                    log.info("train step compiled and run in %.1fs", time.perf_counter() - t_compile)
                    first, t_log, tokens_since = False, time.perf_counter(), 0
                done = step + 1
                if pbar is not None:
                    pbar.update(1)

                log_now = done % cfg.log.every == 0 or done == total or done == p.end
                if log_now:
                    m = jax.device_get(m)  # the loop's only host sync
                    dt = time.perf_counter() - t_log
                    interval = range(max((step // cfg.log.every) * cfg.log.every, p.start), done)
                    row = dict(step=step, phase=p.name, loss=float(m["loss"]), lr=float(m["lr"]),
                               grad_norm=float(m["grad_norm"]), tokens_per_s=tokens_since / max(dt, 1e-9),
                               **source.row_counts(interval))
                    if int(m["skipped_total"]):
                        row["skipped_total"] = int(m["skipped_total"])
                    if cfg.optim.spike_factor:
                        row["loss_ema"] = float(m["loss_ema"])
                    if peak:
                        row["mfu"] = row["tokens_per_s"] * fpt / (peak * jax.device_count())
                    write(row)
                    last_row = row
                    if is_main:
                        log.info(_log_line(step, total, p.name, row))
                    t_log, tokens_since = time.perf_counter(), 0
                    if int(m["skips"]) >= cfg.optim.max_skips:
                        raise StopRun(f"{int(m['skips'])} consecutive updates skipped (non-finite or spiking loss) at "
                                      f"step {step}; the checkpoint holds the last good state: lower the LR or inspect "
                                      "the data")

                if cfg.debug.kill_at_step == done and not cfg.debug.kill_in_save:
                    os.kill(os.getpid(), signal.SIGKILL)  # fault tests: a kill between an update and its save
                if done == p.end and p.schedule.kind == "infinite" and p.schedule.branch:
                    state = release_and_rewind(p, state)
                if done == p.end or done == total:
                    if done == total:  # the final eval (other phase ends are evaluated as the next phase's baseline)
                        try:
                            run_eval(done)
                        except StopRun as e:
                            stop_reason = str(e)
                    if not math.isfinite(last_row.get("loss", 0.0)):  # phase ends are kept forever: only good ones
                        raise StopRun(f"the last logged loss before the end of phase {p.name} (step {done}) is "
                                      f"{last_row['loss']}; its phase-end checkpoint is not written: inspect the data")
                    save(done, "phase_end", p.name)
                    if stop_reason:
                        raise StopRun(stop_reason)
                elif store.due(done) or done in branch_points:
                    save(done, "branch_point" if done in branch_points else "interval", p.name)

                if cfg.debug.preempt_at_step == done:
                    os.kill(os.getpid(), signal.SIGTERM)
                if preempt.agreed(at_boundary=log_now):
                    if not store.has(done):
                        save(done, "preemption", p.name)
                    store.wait()
                    log.warning("preempted: saved step %d; resume with the same command (clt train CONFIG --workdir %s)",
                                done, wd)
                    emit(dict(event="preempted", step=done))
                    stop_reason = "preempted"
                    break

        except StopRun as e:  # alerts with on_alert=stop, repeated skips, a non-finite state
            stop_reason = str(e)

    done = int(state["step"])
    if stop_reason and stop_reason != "preempted":
        if not store.has(done) and math.isfinite(last_row.get("loss", 0.0)):
            try:  # the last good state, to inspect or resume; never a non-finite one
                save(done, "stop", plan.phase_at(max(done - 1, 0)).name)
            except StopRun as e:
                log.warning("%s", e)
        emit(dict(event="stopped", step=done, reason=stop_reason))
        log.error("run stopped at step %d: %s", done, stop_reason)
    if buffer is not None and is_main and done == total:
        buffer.snapshot(total)  # the final buffer, ready for `clt replay export`
    store.close()
    if done == total and not stop_reason:
        emit(dict(event="finished", step=total))
        log.info("finished: %d steps in %s", total, wd)
    if pbar is not None:
        pbar.close()
    for sink in sinks:
        sink.close()
    if events is not None:
        events.close()
    if stop_reason and stop_reason != "preempted":
        raise StopRun(stop_reason)
    return dict(last_row, stopped=stop_reason, final_step=done)
