"""The one Orbax layer: save, restore, resume, init_from, and what a changed plan may change on resume.

A checkpoint at step s holds the train state after s updates (params, moments, step, loss statistics) and a
JSON `meta` item: the resolved plan, its digest, the data manifests, init_from and package versions. Orbax
writes each checkpoint into a temporary folder and renames it when complete, so a crash mid-save never
corrupts the previous one; a finalised folder that is damaged later is skipped with a warning on resume.

Restoring goes through an abstract tree carrying the *current* run's shardings, so a checkpoint written on
one mesh restores onto any other (device count and axis sizes may differ).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import pathlib
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from clt.config import CheckpointConfig, Config, ConfigError
from clt.plan import PhasePlan, Plan, resolve

log = logging.getLogger("clt")

_PACKAGES = ("clt", "jax", "flax", "optax", "orbax-checkpoint", "grain")


def versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays carrying target shardings: what Orbax restores into (any mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class _KeepSteps(ocm.PreservationPolicy):
    """Preserve the steps in a live set: phase ends become known (and grow) after the manager is built, and
    Orbax's CustomSteps copies its steps at construction."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class CheckpointStore:
    """`<workdir>/checkpoints/<step>`: async saves, keep the latest K plus every phase end."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig, phase_ends: tuple[int, ...] = (),
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        self._last_save_time = time.monotonic()
        self._phase_ends = set(phase_ends)
        preservation = ocm.AnyPreservationPolicy([ocm.LatestN(cfg.keep), _KeepSteps(self._phase_ends)])
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=cfg.async_save, create=not read_only,
                                               preservation_policy=preservation, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def keep_steps(self, steps: tuple[int, ...]) -> None:
        """Steps kept regardless of `keep`: phase ends and branch points (known only after the store opens)."""
        self._phase_ends.clear()
        self._phase_ends.update(steps)

    # ------------------------------------------------------------------------------------------ queries
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def has(self, step: int) -> bool:
        return step in self.manager.all_steps()

    def due(self, step: int) -> bool:
        """An interval save: every `every` steps or `every_minutes` since the last save."""
        if self.cfg.every and step % self.cfg.every == 0:
            return True
        minutes = (time.monotonic() - self._last_save_time) / 60
        return bool(self.cfg.every_minutes) and minutes >= self.cfg.every_minutes

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # ------------------------------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, meta: dict, phase_end: bool = False) -> None:
        if phase_end:
            self._phase_ends.add(step)
        meta = dict(meta, step=step, time=time.time(), phase_end=phase_end, versions=versions())
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._last_save_time = time.monotonic()

    def restore(self, step: int, abstract: Any, shardings: Any) -> Any:
        target = with_shardings(abstract, shardings)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def restore_latest(self, abstract: Any, shardings: Any) -> tuple[int, Any]:
        """The newest checkpoint that restores; damaged ones are skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract, shardings)
            except Exception as e:  # a damaged checkpoint must not end the run while an older one is good
                log.warning("checkpoint %d in %s is incomplete or damaged (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e)[:200])
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------------------
# Resuming with a (possibly) changed plan.
# ----------------------------------------------------------------------------------------------------------
# Fields that follow from a phase's duration: a `percent` phase may see them change with the budget, and the
# pinned past wins (the plan that ran is the authority); any other change to a phase that ran is an error.
_RANGE_FIELDS = {"start", "end", "row_start", "upsample_start", "replay_weights"}
_RANGE_SCHEDULE_FIELDS = {"warmup", "decay", "cooldown", "anneal", "chain_start"}


def _phase_changes(old: PhasePlan, new: PhasePlan, percent: bool) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every change that matters to a phase that ran."""
    skip = _RANGE_FIELDS if percent else set()
    old_d, new_d = dataclasses.asdict(old), dataclasses.asdict(new)
    changed = [(k, old_d[k], new_d[k]) for k in old_d if k not in skip | {"schedule"} and old_d[k] != new_d[k]]
    skip_s = _RANGE_SCHEDULE_FIELDS if percent else set()
    old_s, new_s = old.schedule.defining(), new.schedule.defining()
    changed += [(f"schedule.{k}", old_s[k], new_s.get(k)) for k in old_s
                if k not in skip_s and old_s[k] != new_s.get(k)]
    return changed


def check_resume_plan(cfg: Config, meta: dict, step: int, manifest: dict[str, str],
                      accept_changed_past: bool = False) -> Plan:
    """The plan to continue with at `step`: phases that started keep what they ran; later ones come from cfg.

    Editing future phases, appending phases or pointing a future phase at new data is fine. A change to a
    phase that has already started, or to the data it trained on, is an error naming the field, unless
    `accept_changed_past` (the CLI's --accept-changed-past) says the user means it."""
    if accept_changed_past:
        return resolve(cfg)
    ran = Plan.from_json(meta["plan"]).with_domains(cfg.domain_names())
    # These fix which example every past row was: changing them would rewrite the past.
    for field, old, new in (("seed", ran.seed, cfg.seed), ("data.seq_len", ran.seq_len, cfg.data.seq_len),
                            ("data.block_rows", ran.block_rows, cfg.data.block_rows)):
        if old != new:
            raise ConfigError(field, new, f"the run so far used {old}", "restore it, or pass --accept-changed-past")
    started = [p for p in ran.phases if p.start < step]
    if len(cfg.phases) < len(started):
        raise ConfigError("phases", [ph.name for ph in cfg.phases], f"phases that already ran were removed "
                          f"(ran: {[p.name for p in started]})", "keep them, or pass --accept-changed-past")
    fresh = resolve(cfg)
    for old, new, ph in zip(started, fresh.phases, cfg.phases):
        changed = _phase_changes(old, new, percent=ph.percent is not None)
        if changed:
            key, before, after = changed[0]
            raise ConfigError(f"phases.{old.name}.{key}", after, f"phase {old.name!r} already ran (from step "
                              f"{old.start}) with {key}={before!r}",
                              "restore its old value, or pass --accept-changed-past to change the past knowingly")
    for old in started:
        for d in (d for d, w in zip(ran.domains, old.mixture) if w > 0):
            before = meta.get("data", {}).get(d)
            if before is not None and d in manifest and manifest[d] != before:  # gone data is fine: it ran
                raise ConfigError(f"data.domains.{d}", dict(cfg.data.domains).get(d),
                                  f"the data of domain {d!r} changed since phase {old.name!r} trained on it",
                                  "point a new domain name at the new data for future phases, or pass "
                                  "--accept-changed-past")
    return resolve(cfg, past=ran, through_step=step)


def check_init_from(meta: dict, init_from: str) -> None:
    """Checkpoints win over init_from, but they must come from the same init_from."""
    recorded = meta.get("init_from", "")
    if init_from and recorded != init_from:
        raise ConfigError("model.init_from", init_from, f"this workdir's checkpoints were started from "
                          f"{recorded or 'scratch'!r}", "use a new --workdir, or drop --init-from to resume")


def parse_init_from(spec: str) -> tuple[str, pathlib.Path, int | None]:
    kind, _, rest = spec.partition(":")
    step = None
    if kind == "ckpt" and "@" in rest:
        rest, _, s = rest.rpartition("@")
        if not s.isdigit():
            raise ConfigError("model.init_from", spec, "the step after @ must be a number", "e.g. ckpt:runs/a@500")
        step = int(s)
    return kind, pathlib.Path(rest), step


def load_init_weights(spec: str, abstract_params: Any, shardings: Any, cfg: CheckpointConfig) -> Any:
    """Params from another run's checkpoint (latest, or @STEP), restored onto this run's shardings."""
    kind, path, step = parse_init_from(spec)
    if kind == "hf":
        raise ConfigError("model.init_from", spec, "Hugging Face import is not part of this clt version",
                          "start from a clt checkpoint (ckpt:WORKDIR) instead")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not directory.is_dir():
        raise ConfigError("model.init_from", spec, f"no checkpoints at {directory}", "give a clt workdir")
    store = CheckpointStore(directory, cfg, read_only=True)
    steps = store.steps()
    if not steps or (step is not None and step not in steps):
        raise ConfigError("model.init_from", spec, f"no checkpoint {step if step is not None else ''} in "
                          f"{directory} (has {steps})", "pick one of those steps")
    target = with_shardings(abstract_params, shardings)
    chosen = step if step is not None else steps[-1]
    try:  # params only: the source run's optimizer may differ
        item = {"params": target}
        restored = store.manager.restore(chosen, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))["state"]
    except (ValueError, KeyError) as e:
        raise ConfigError("model.init_from", spec, f"its params do not fit this model ({str(e)[:200]})",
                          "use the same model shape as the source run") from None
    finally:
        store.close()
    return restored["params"]


def describe(store: CheckpointStore) -> list[dict]:
    """One row per checkpoint for `clt ckpt ls`: step, phase, time, size, complete?"""
    rows = []
    for step in store.steps():
        folder = store.directory / str(step)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        try:
            meta, complete = store.meta(step), True
        except Exception:  # unreadable meta: list it as damaged rather than fail the listing
            meta, complete = {}, False
        when = meta.get("time")
        rows.append(dict(step=step, phase=meta.get("phase", "?"),
                         time=datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S") if when else "?",
                         size_mb=round(size / 2**20, 2), phase_end=meta.get("phase_end", False), complete=complete))
    tmp = [p.name for p in store.directory.glob("*.orbax-checkpoint-tmp*")]
    for name in tmp:
        rows.append(dict(step=name, phase="?", time="?", size_mb=0, phase_end=False, complete=False))
    return rows


def meta_json(meta: dict) -> str:
    return json.dumps(meta, indent=1, default=str)
