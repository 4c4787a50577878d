"""The training loop: walk a phase plan on a device mesh, evaluating, logging and checkpointing.

`train()` holds the workdir's lock around two parts: `Run.start()` sets everything up (plan, data, mesh,
model, the restore or the fresh start, the run files) and `Run.loop()` reads top to bottom in banner-marked
sections (big_vision style). Everything that changes over training is computed from the plan and the global
step; the train state (step.py) holds only params, optimizer moments, the step and loss statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import jax

from clt import checkpoint, monitor, replay, resume, sharding, step
from clt.config import Config, ConfigError
from clt.data.pipeline import (BatchSource, check_data_needed, data_manifest, device_prefetch, iterate,
                               load_domains)
from clt.data.tokenizer import load_tokenizer
from clt.evaluate import (evaluate, evaluate_task, load_choice_task, load_eval_sets, make_eval_step,
                          make_score_step)
from clt.metrics import (JsonlWriter, StepClock, TensorBoardSink, WandbSink, eval_line, log_line, mfu,
                         peak_flops, read_jsonl)
from clt.model import ATTENTION_FLOPS, flops_per_token, param_count
from clt.optim import make_optimizer
from clt.plan import PhasePlan, resolve

log = logging.getLogger("clt")


class StopRun(RuntimeError):
    """The run stopped itself (repeated skipped updates, an alert with on_alert="stop", a non-finite state)."""


@dataclass
class Cadence:
    """The one answer to "is it time to evaluate / log / save at `step`": every `every` steps, at the listed
    steps, or once `minutes` have passed since the last `mark()`."""

    every: int = 0
    at: frozenset[int] = frozenset()
    minutes: float = 0.0
    since: float = field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        return self.scheduled(step) or self.time_up()

    def scheduled(self, step: int) -> bool:
        """Due by step number alone: the same answer on every host."""
        return step in self.at or (self.every > 0 and step % self.every == 0)

    def time_up(self) -> bool:
        """Due by this process's clock (hosts' clocks differ: see `Run.save_due`)."""
        return self.minutes > 0 and (time.monotonic() - self.since) / 60 >= self.minutes

    def mark(self) -> None:
        self.since = time.monotonic()


def train(cfg: Config, workdir: str, *, init_from: str | None = None, accept_changed_past: bool = False,
          progress: bool = True) -> dict:
    """Train `cfg`'s plan in `workdir` (resuming from its checkpoints); returns the last log row.

    Holds the workdir's lock for the whole run: a second `clt train` on the same workdir is refused."""
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if init_from:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from))
    lock = resume.WorkdirLock(wd).acquire() if jax.process_index() == 0 else None
    run = None
    try:
        checkpoint.check_shared_workdir(wd)
        run = Run(cfg, wd)
        finished = run.start(accept_changed_past)  # a finished run has nothing left to train
        return finished if finished is not None else run.loop(progress)
    except BaseException:
        if run is not None and run.wandb is not None:
            run.wandb.close(exit_code=1)  # the W&B run ends as failed, not left running until the process exits
        # Nothing half-written stays behind (a full disk, a crash in a save): the next run resumes from the last
        # complete checkpoint either way, and a leftover temporary folder only takes space the disk may lack.
        checkpoint.remove_partial_saves(wd / "checkpoints")
        raise
    finally:
        if lock is not None:
            lock.release()


def has_checkpoints(wd: pathlib.Path) -> bool:
    own = wd / "checkpoints"
    return own.is_dir() and any(p.name.isdigit() for p in own.iterdir())


def with_source_model(cfg: Config, wd: pathlib.Path) -> Config:
    """`cfg` with its init_from source's architecture. A run that has checkpoints takes it from its own
    (the same fields, recorded at its start), so a resume does not need the source any more."""
    spec = cfg.model.init_from
    if has_checkpoints(wd):
        try:
            fields = checkpoint.source_model_fields(f"ckpt:{wd}", cfg.checkpoint)
        except Exception:  # noqa: BLE001 - unreadable: the resume reports it; the source still gives the fields
            fields = checkpoint.source_model_fields(spec, cfg.checkpoint)
    else:
        fields = checkpoint.source_model_fields(spec, cfg.checkpoint)
    return dataclasses.replace(cfg, model=cfg.model.adopt(fields, spec))


def check_source_tokenizer(cfg: Config, data: dict, wd: pathlib.Path) -> dict:
    """The data's tokenizer {name, fingerprint}; a run starting from init_from must use the source model's (a
    resume was checked at its start: the source may be gone)."""
    some = next(iter(data.values()))
    mine = dict(name=some.tokenizer, fingerprint=some.tokenizer_fingerprint)
    fresh = cfg.model.init_from and not has_checkpoints(wd)
    source = checkpoint.source_tokenizer(cfg.model.init_from, cfg.checkpoint) if fresh else None
    if source and source.get("fingerprint") and mine["fingerprint"] and source["fingerprint"] != mine["fingerprint"]:
        name, domain = next(iter(data.items()))
        raise ConfigError(f"data.domains.{name}", domain.path, f"the data was prepared with tokenizer {mine['name']} "
                          f"({mine['fingerprint']}), the model {cfg.model.init_from} uses {source['name']} "
                          f"({source['fingerprint']})", f"prepare the data with --tokenizer {source['name']}")
    return mine


class Run:
    """One invocation of `clt train` on a workdir: its setup, the loop, and the actions the loop takes."""

    def __init__(self, cfg: Config, wd: pathlib.Path):
        self.cfg, self.wd, self.is_main = cfg, wd, jax.process_index() == 0
        self.sinks: list = []  # process 0 writes the run's files
        self.events: JsonlWriter | None = None
        self.wandb: WandbSink | None = None  # also in sinks; it receives the events too

    # ------------------------------------------------------------------------------------------------ Setup
    def start(self, accept_changed_past: bool) -> dict | None:
        """Everything before the first step; a finished run returns its result here (nothing to train)."""
        plan = resolve(self.cfg)  # first: a config error must not wait for the devices, the data or the model
        if self.cfg.model.init_from:  # the model is the source's (its config.json, or its run's config)
            self.cfg = with_source_model(self.cfg, self.wd)
        cfg, wd = self.cfg, self.wd
        self.data = data = load_domains(cfg)
        self.tokenizer = check_source_tokenizer(cfg, data, wd)
        manifest = data_manifest(cfg, data)
        self.dims = dims = step.model_dims(cfg, max(d.vocab_size for d in data.values()))
        sharding.check_layout(cfg, plan, jax.device_count(), dims)  # every divisibility, one line each
        eval_domains = tuple(d for d in plan.domains if d in data)  # also checks that seq_len fits each eval split
        self.eval_sets = load_eval_sets(data, eval_domains, plan.seq_len, cfg.data.eval_sequences, cfg.data.eval_batch)
        self.mesh = mesh = sharding.make_mesh(cfg.mesh)
        log.info("mesh %s over %d %s devices (%d processes)", dict(mesh.shape), mesh.size, jax.default_backend(),
                 jax.process_count())
        if self.is_main and cfg.log.tensorboard:  # optional sinks open first: a missing package fails early
            self.sinks.append(TensorBoardSink(wd / "tb"))
        if self.is_main and cfg.log.wandb.enabled:  # opened with the run files, once the plan is resolved
            WandbSink.require(cfg.log.wandb.project)

        # Model and optimizer.
        self.tx = make_optimizer(cfg.optim)
        options = step.model_options(cfg, next(iter(data.values())).train.eos_id, dims)
        self.graphdef, params, self.abstract, self.state_sh = step.state_layout(dims, mesh, self.tx, seed=cfg.seed,
                                                                                **options)
        model = resume.model_record(cfg, dims)

        # Resume or start. Priority: 1. this workdir's newest good checkpoint (damaged ones go to quarantine);
        # 2. init_from weights with a fresh optimizer at step 0; 3. fresh initialisation from the seed.
        self.store = checkpoint.CheckpointStore(wd / "checkpoints", cfg.checkpoint)
        begin = resume.find_start(self.store, cfg, plan, manifest, model, self.abstract, self.state_sh,
                                  accept_changed_past)
        self.plan = plan = begin.plan
        self.first, self.state = begin.step, begin.state
        # An infinite schedule's branch anneal: the state at the anneal's start is where the next phase continues.
        self.branch_points = frozenset(p.end - p.schedule.anneal for p in plan.phases
                                       if p.schedule.kind == "infinite" and p.schedule.branch)
        self.store.keep_steps(tuple(p.end for p in plan.phases) + tuple(self.branch_points))
        self.buffer = replay.ReplayBuffer(wd / "replay", plan, cfg.replay_buffer.capacity, data) \
            if cfg.replay_buffer.capacity else None
        if self.first == plan.total_steps:
            return self.already_finished()

        check_data_needed(plan, data, self.first, cfg)
        for name, path in cfg.data.domains:  # allowed (no phase from here on draws from it), but a typo looks alike
            if name not in data:
                log.warning("data.domains.%s: no prepared data at %s: not evaluated (no phase from here on draws "
                            "from it)", name, path)
        self.source = BatchSource(plan, data, host=jax.process_index(), hosts=jax.process_count())
        self.loaded = None
        if cfg.replay_buffer.load:
            self.loaded = replay.BufferSnapshot(cfg.replay_buffer.load)
            some = next(iter(data.values()))
            self.loaded.check_compatible(plan.seq_len, some.vocab_size, some.tokenizer)
        self.meta = dict(plan=plan.to_json(), digest=plan.digest(), data=manifest, init_from=cfg.model.init_from,
                         model=model, config=cfg.to_dict(), tokenizer=self.tokenizer)
        self.open_run_files(manifest)
        events = resume.start_events(begin, cfg)
        for event in events:
            self.emit(event)
        if self.state is not None:
            log.info("resumed from the checkpoint at step %d of %d", self.first, plan.total_steps)
            changes = next((e["changes"] for e in events if e["event"] == "config_change"), {})
            if changes:
                log.info("settings changed since the checkpoint: %s",
                         ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        else:
            if cfg.model.init_from:
                params = checkpoint.load_init_weights(cfg.model.init_from, dims, self.abstract.params,
                                                      self.state_sh.params, cfg.checkpoint,
                                                      progress=self.is_main and sys.stderr.isatty())
                self.emit(dict(event="init_from", step=0, source=cfg.model.init_from))
                log.info("initialised from %s (fresh optimizer, step 0)", cfg.model.init_from)
            self.state = step.init_state(params, self.tx, self.state_sh)
        log.info("model %s, %.2fM params, %s attention; plan %s: %d phases, %d steps; workdir %s",
                 cfg.model.preset or "custom", param_count(dims) / 1e6, options["attention"], plan.digest(),
                 len(plan.phases), plan.total_steps, wd)
        self.prepare_step_and_evals()
        return None

    def already_finished(self) -> dict:
        """A re-run of a finished run changes nothing; it completes what a kill after the last save cut."""
        total = self.plan.total_steps
        if self.is_main:
            if self.buffer is not None:
                self.buffer.snapshot(total)
            if not any(e.get("event") == "finished" for e in read_jsonl(self.wd / "events.jsonl")):
                JsonlWriter(self.wd / "events.jsonl").write(dict(event="finished", step=total))
        self.store.close()
        return dict(stopped=None, final_step=total, already_finished=True)

    def open_run_files(self, manifest: dict[str, str]) -> None:
        """Keyed by step: rows this run writes again are dropped first, so the files read as one run."""
        if self.is_main:
            resume.rewrite_run_files(self.wd, self.first)
            resume.write_record(self.wd, self.plan, manifest, self.cfg)
            self.sinks.insert(0, JsonlWriter(self.wd / "metrics.jsonl"))
            self.events = JsonlWriter(self.wd / "events.jsonl")
            if self.cfg.log.wandb.enabled:
                config = dict(self.meta["config"], plan=dict(self.meta["plan"], digest=self.meta["digest"]),
                              workdir=str(self.wd.resolve()))
                self.wandb = WandbSink(self.wd, self.cfg.log.wandb, config)
                self.sinks.append(self.wandb)

    def prepare_step_and_evals(self) -> None:
        """The compiled update, the eval and task steps, the gap monitor (caught up on a resume), the MFU terms."""
        cfg, plan, mesh = self.cfg, self.plan, self.mesh
        self.batch_sh = sharding.batch_sharding(mesh)
        self.step_fn = step.compile_step(self.graphdef, self.tx, plan, cfg.optim, self.state_sh, self.batch_sh,
                                         sharding.replicated(mesh))
        self.eval_fn = make_eval_step(self.graphdef)
        tokenizer = load_tokenizer(next(iter(self.data.values())).tokenizer)
        self.tasks = [load_choice_task(t, tokenizer, plan.seq_len, cfg.data.eval_batch) for t in cfg.monitor.tasks]
        self.score_fn = make_score_step(self.graphdef) if self.tasks else None
        # Every host holds the whole eval set, so eval arrays are put as global values (not per-host slices).
        rows_sh = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
        self.put_eval = lambda x: jax.device_put(x, self.batch_sh if x.ndim == 2 else rows_sh)
        self.gap_monitor = monitor.GapMonitor(plan, cfg.monitor)
        kind = jax.devices()[0].device_kind
        self.peak = peak_flops(kind)  # None on devices without a known peak (CPU): no MFU
        self.flops_per_token = flops_per_token(self.dims, plan.seq_len)
        if self.is_main and self.peak:
            log.info("MFU counts %.1f MFLOP/token (%s attention FLOPs, MaxText's convention) against %.0f TFLOP/s "
                     "per %s", self.flops_per_token / 1e6, ATTENTION_FLOPS, self.peak / 1e12, kind)
        elif self.is_main:
            log.info("no MFU: no dense bf16 peak is known for device kind %r (clt.metrics.PEAK_FLOPS)", kind)
        if self.first > 0:  # the switches before the resume keep their baselines and their already-sent events
            self.gap_monitor.catch_up(read_jsonl(self.wd / "metrics.jsonl"))

    # ------------------------------------------------------------------------------------------------ Actions
    def emit(self, event: dict) -> None:
        if self.events is not None:
            self.events.write(event)
        if self.wandb is not None:
            self.wandb.event(event)

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def run_eval(self, at: int) -> dict:
        """Held-out losses (and tasks) at `at` updates; feeds the gap monitor, whose alerts may stop the run."""
        self.flush()
        t0, cfg, params = time.perf_counter(), self.cfg, self.state.params
        with self.clock.aside("eval", wait=self.state):
            row = dict(step=at, phase=self.plan.phase_at(min(at, self.plan.total_steps - 1)).name,
                       **evaluate(self.eval_fn, params, self.eval_sets, cfg.data.eval_batch, self.put_eval))
            for task in self.tasks:
                row.update(evaluate_task(self.score_fn, params, task, cfg.data.eval_batch, self.put_eval))
        self.write(row)
        if self.is_main:
            log.info(eval_line(row, time.perf_counter() - t0))
        for event in self.gap_monitor.update(row):
            self.emit(event)
            line = monitor.describe_event(event)
            if line and self.is_main:
                log.info(line)
            if event["event"] == "alert":
                log.warning("ALERT %s", event["message"])
                if cfg.monitor.on_alert == "stop":
                    raise StopRun(event["message"])
        return row

    def save(self, at: int, kind: str, phase: str) -> None:
        """Save the state. Scheduled saves are events of the run (written first, so a kill before the save
        completes drops the event with it on restart); preemption and stop saves are told by their own event."""
        self.flush()
        if kind not in ("preemption", "stop"):
            self.emit(dict(event="checkpoint", step=at, kind=kind))
        try:
            with self.clock.aside("checkpoint", wait=self.state):  # the time the loop is blocked, not the write
                self.store.save(at, self.state, meta=dict(self.meta, phase=phase), phase_end=kind == "phase_end")
        except checkpoint.NonFiniteState as e:
            raise StopRun(str(e)) from None
        self.save_cadence.mark()
        if self.cfg.debug.kill_in_save and self.cfg.debug.kill_at_step == at:
            os.kill(os.getpid(), signal.SIGKILL)  # fault tests: a kill while the save is being written
        if self.is_main:
            log.info("checkpoint %d (%s) saving to %s", at, kind.replace("_", " "), self.store.directory / str(at))

    def release_and_rewind(self, p: PhasePlan) -> None:
        """A branch anneal ends: keep its result as a release checkpoint (<workdir>/releases/<phase>/, evaluated
        as `release/eval/...`), and continue from the state saved at the anneal's start, at eta_const."""
        self.flush()
        release = checkpoint.CheckpointStore(self.wd / "releases" / p.name, self.cfg.checkpoint)
        with self.clock.aside("checkpoint", wait=self.state):
            if not release.has(p.end):  # a run killed right after this save redoes it identically: keep the first
                release.save(p.end, self.state, meta=dict(self.meta, phase=p.name, release=True))
            release.close()
        with self.clock.aside("eval"):
            scores = evaluate(self.eval_fn, self.state.params, self.eval_sets, self.cfg.data.eval_batch,
                              self.put_eval)
        self.write(dict(step=p.end, phase=p.name, **{f"release/{k}": v for k, v in scores.items()}))
        self.emit(dict(event="release", step=p.end, phase=p.name, path=f"releases/{p.name}"))  # workdir-relative
        log.info("release %s: annealed model saved to %s; continuing from step %d's state", p.name,
                 self.wd / "releases" / p.name, p.end - p.schedule.anneal)
        with self.clock.aside("checkpoint"):
            self.store.wait()
            before = self.store.restore(p.end - p.schedule.anneal, self.abstract, self.state_sh)
        self.state = before.replace(step=self.state.step)

    def before_phase(self, p: PhasePlan) -> None:
        """Replay buffer: its contents are a pure function of (seed, plan, step); tokens are materialised at phase
        boundaries into <workdir>/replay/step-<s>/ (see replay.py). A loaded buffer is the replay source instead."""
        if self.buffer is not None and p.index > 0:
            if self.is_main:
                self.buffer.snapshot(p.start)  # materialise while the previous phase's data still exists
            if jax.process_count() > 1:  # the other hosts open what process 0 wrote
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"clt-replay-{p.start}")
        if p.replay_share > 0 and p.replay_source == "buffer":
            self.source.buffer = self.loaded if self.loaded is not None else self.buffer.snapshot(p.start)
            log.info("phase %s replays %.0f%% from the buffer (%d sequences, %s)", p.name, 100 * p.replay_share,
                     self.source.buffer.fill, self.source.buffer.composition())

    def flush(self) -> dict:
        """Write the pending log row: the metrics of a log interval's last step, read after the next step was
        dispatched (so the device never idles for a log line), or right away before an eval, a save or the
        end. Stops the run after `optim.max_skips` consecutive skipped updates."""
        if self.pending is None:
            return self.last_row
        m, at, p, (tokens, steps) = self.pending
        self.pending = None
        m = jax.device_get(m)  # the loop's only host sync, one step behind the device
        every = self.cfg.log.every
        interval = range(max((at // every) * every, p.start), at + 1)
        # An interval holding only the first step (its compile timed apart) has no train time to report.
        timing = self.clock.interval(tokens, steps) if steps else {}
        row = dict(step=at, phase=p.name, loss=float(m["loss"]), lr=float(m["lr"]), grad_norm=float(m["grad_norm"]),
                   **timing, **self.source.row_counts(interval))
        if int(m["skipped_total"]):
            row["skipped_total"] = int(m["skipped_total"])
        if self.cfg.optim.spike_factor:
            row["loss_ema"] = float(m["loss_ema"])
        if self.peak and timing:
            row["mfu"] = mfu(row["tokens_per_s"], self.flops_per_token, self.peak, jax.device_count())
        self.write(row)
        if self.is_main:
            log.info(log_line(at, self.plan.total_steps, p.name, row))
        self.last_row = row
        if int(m["skips"]) >= self.cfg.optim.max_skips:
            raise StopRun(f"{int(m['skips'])} consecutive updates skipped (non-finite or spiking loss) at step {at}; "
                          "the checkpoint holds the last good state: lower the LR or inspect the data")
        return row

    # ------------------------------------------------------------------------------------------------ The loop
    def loop(self, progress: bool) -> dict:
        cfg, plan, wd, debug = self.cfg, self.plan, self.wd, self.cfg.debug
        total = plan.total_steps
        switches = {s["step"]: s for s in plan.switches()}
        eval_cadence = Cadence(at=frozenset(monitor.eval_steps(plan, cfg.monitor)))
        log_cadence = Cadence(every=cfg.log.every, at=frozenset(p.end for p in plan.phases))
        self.save_cadence = Cadence(every=cfg.checkpoint.every, minutes=cfg.checkpoint.every_minutes,
                                    at=self.branch_points)
        put = lambda batch: jax.make_array_from_process_local_data(self.batch_sh, batch["tokens"])  # noqa: E731
        self.last_row, self.pending, self.clock = {}, None, StepClock()
        stop_reason = None
        pbar, redirect = self.progress_bar(progress)
        with sharding.use_mesh(self.mesh), checkpoint.Preemption() as preempt, redirect:
            batches = device_prefetch(iterate(self.source, self.first, total, cfg.data.prefetch, self.before_phase), put)
            try:
                for at, batch in batches:
                    # -------------------------------------------------------------------------------- Switches
                    p = plan.phase_at(at)
                    if at == p.start:
                        self.emit(dict(event="phase_start", step=at, phase=p.name))
                    if at in switches or at == p.start:
                        log.info(monitor.describe_switch(plan, switches.get(at, dict(step=at, kind="phase",
                                                                                     phase=p.name))))
                    if at == p.start and at > 0 and p.optimizer == "reset":
                        self.flush()
                        self.state = step.reset_optimizer(self.state, self.tx, self.state_sh)
                        log.info("phase %s: optimizer state reset", p.name)
                    if eval_cadence.due(at):
                        self.run_eval(at)

                    # -------------------------------------------------------------------------------- Update
                    if at == self.first:  # the compile is the first minute of a run: say so, keep it out of tokens/s
                        log.info("compiling the train step (batch %d x %d tokens on %d devices)...", p.batch_size,
                                 plan.seq_len, self.mesh.size)
                        with self.clock.aside("compile"):
                            self.state, m = self.step_fn(self.state, batch)
                            jax.block_until_ready(m["loss"])
                        log.info("train step compiled and run in %.1fs", self.clock.totals["compile"])
                        self.clock.restart()
                    else:
                        self.state, m = self.step_fn(self.state, batch)
                        self.clock.add(p.batch_size * plan.seq_len)
                    self.flush()  # the last interval's row: its step finished while this one was being queued
                    done = at + 1
                    if pbar is not None:
                        pbar.update(1)

                    # -------------------------------------------------------------------------------- Log
                    log_now = log_cadence.due(done)
                    if log_now:  # written by the next flush(), after the next step is dispatched
                        self.pending = (m, at, p, self.clock.cut())

                    # -------------------------------------------------------------------------------- Save
                    if debug.kill_at_step == done and not debug.kill_in_save:
                        os.kill(os.getpid(), signal.SIGKILL)  # fault tests: a kill between an update and its save
                    if done == p.end and p.schedule.kind == "infinite" and p.schedule.branch:
                        self.release_and_rewind(p)
                    if done == p.end:
                        last_row = self.flush()
                        if done == total:  # the final eval (other phase ends are evaluated as the next baseline)
                            try:
                                self.run_eval(done)
                            except StopRun as e:
                                stop_reason = str(e)
                        if not math.isfinite(last_row.get("loss", 0.0)):  # phase ends are kept forever: good only
                            raise StopRun(f"the last logged loss before the end of phase {p.name} (step {done}) is "
                                          f"{last_row['loss']}; its phase-end checkpoint is not written: inspect the "
                                          "data")
                        self.save(done, "phase_end", p.name)
                        if stop_reason:
                            raise StopRun(stop_reason)
                    elif self.save_due(done, log_now):
                        self.save(done, "branch_point" if done in self.branch_points else "interval", p.name)

                    # -------------------------------------------------------------------------------- Preemption
                    if debug.preempt_at_step == done:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if preempt.agreed(done, at_boundary=log_now):
                        if not self.store.has(done):
                            self.save(done, "preemption", p.name)
                        with self.clock.aside("checkpoint"):
                            self.store.wait()
                        log.warning("preempted: saved step %d; resume with the same command (clt train CONFIG "
                                    "--workdir %s)", done, wd)
                        self.emit(dict(event="preempted", step=done, time=self.clock.summary()))
                        stop_reason = "preempted"
                        break
            except StopRun as e:  # alerts with on_alert=stop, repeated skips, a non-finite state
                stop_reason = str(e)
        return self.finish(stop_reason, pbar)

    def save_due(self, done: int, log_now: bool) -> bool:
        """Whether to save after step `done`. Steps due by number are the same on every host; the clock of
        `checkpoint.every_minutes` is each host's own, so with several processes it is read at log boundaries
        only and one host's "time is up" is everyone's (a save is collective: one host alone would hang it)."""
        cadence = self.save_cadence
        if cadence.scheduled(done):
            return True
        if cadence.minutes <= 0:
            return False
        if jax.process_count() == 1:
            return cadence.time_up()
        return log_now and checkpoint.hosts_any(cadence.time_up())

    def progress_bar(self, progress: bool) -> tuple[Any, contextlib.AbstractContextManager]:
        """A bar on a terminal (log lines printed above it); plain lines in logs (SLURM, tee)."""
        if not (progress and self.is_main and sys.stderr.isatty()):
            return None, contextlib.nullcontext()
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        pbar = tqdm(total=self.plan.total_steps, initial=self.first, unit="step", dynamic_ncols=True, leave=False)
        return pbar, logging_redirect_tqdm(loggers=[log])

    def finish(self, stop_reason: str | None, pbar: Any) -> dict:
        """After the loop: the last pending row; a stopped run saves its last good state; the final buffer; the
        time spent by kind; files closed."""
        try:
            self.flush()
        except StopRun as e:
            stop_reason = stop_reason or str(e)
        last_row, timing = self.last_row, self.clock.summary()
        done, total = int(self.state.step), self.plan.total_steps
        if stop_reason and stop_reason != "preempted":
            if not self.store.has(done) and math.isfinite(last_row.get("loss", 0.0)):
                try:  # the last good state, to inspect or resume; never a non-finite one
                    self.save(done, "stop", self.plan.phase_at(max(done - 1, 0)).name)
                except StopRun as e:
                    log.warning("%s", e)
            self.emit(dict(event="stopped", step=done, reason=stop_reason, time=timing))
            log.error("run stopped at step %d: %s", done, stop_reason)
        if self.buffer is not None and self.is_main and done == total:
            self.buffer.snapshot(total)  # the final buffer, ready for `clt replay export`
        self.store.close()
        if done == total and not stop_reason:
            self.emit(dict(event="finished", step=total, time=timing))
            log.info("finished: %d steps in %s", total, self.wd)
        if self.is_main:
            log.info("time: train steps %.1fs, eval %.1fs, checkpoints %.1fs, compile %.1fs", timing["train_s"],
                     timing["eval_s"], timing["checkpoint_s"], timing["compile_s"])
        if pbar is not None:
            pbar.close()
        for sink in self.sinks:
            sink.close()
        if self.events is not None:
            self.events.close()
        if stop_reason and stop_reason != "preempted":
            raise StopRun(stop_reason)
        return dict(last_row, stopped=stop_reason, final_step=done)
