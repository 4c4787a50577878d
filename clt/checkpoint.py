"""The one Orbax layer: save, verify, restore, quarantine, preemption, init_from weights (clt or Hugging Face).

A checkpoint at step s holds the train state after s updates (params, moments, step, loss statistics) and a
JSON `meta` item: the resolved plan, its digest, the data manifests, the model's shape, the config, init_from,
package versions, and a content fingerprint of every array. Orbax writes each checkpoint into a temporary
folder and renames it when complete, so a crash mid-save never corrupts the previous one.

What can still go wrong is damage after the fact (a truncated or overwritten file, a bad disk, a copy cut
short). A checkpoint is *damaged* when Orbax cannot read it, when a restored array's fingerprint differs from
the one recorded at save time, or when it holds a non-finite value; a damaged checkpoint is moved to
`checkpoints/quarantine/<step>-<reason>` and the previous one is tried. A checkpoint that reads fine but does
not fit the current model (other shapes or dtypes) is not damage: it is a config error, and nothing is moved.

Restoring goes through an abstract tree carrying the *current* run's shardings, so a checkpoint written on
one mesh restores onto any other (device count and axis sizes may differ).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import pathlib
import shutil
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from clt.config import ARCH_FIELDS, CheckpointConfig, ConfigError
from clt.data.tokenizer import load_tokenizer
from clt.hf.arch import HFError, model_fields, read_config
from clt.hf.safetensors import SafetensorsError
from clt.hf.weights import load_params
from clt.model import ModelDims

log = logging.getLogger("clt")

_PACKAGES = ("clt", "jax", "flax", "optax", "orbax-checkpoint", "grain")
QUARANTINE = "quarantine"


class CheckpointDamaged(RuntimeError):
    """A checkpoint that cannot be trusted: unreadable, a fingerprint mismatch, or non-finite values."""

    def __init__(self, step: int, reason: str, detail: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint {step}: {reason} ({detail})")


class NoUsableCheckpoint(RuntimeError):
    """Every checkpoint of a workdir was damaged (all moved to quarantine)."""


class NonFiniteState(RuntimeError):
    """A state with NaN/inf values is never written: it would replace good checkpoints."""


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


# ----------------------------------------------------------------------------------------------------------
# Content fingerprints: detect bytes that changed on disk after a save (Orbax verifies no checksum itself).
# ----------------------------------------------------------------------------------------------------------
def _path_key(path: tuple) -> str:
    """A key path as 'params/layers/1/mlp/...': the same string for a live state and Orbax's metadata tree."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(p for p in parts if p != "value")


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as flat uint32 words (8-byte values give two words, narrower ones are widened)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _fingerprint_leaf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum_i w_i * (2i + 1) mod 2^32 over the array's words, and whether every value is finite.

    Integer sums wrap exactly and associate, so the result is the same on any mesh or device count. Any change
    of a single word changes it (the weights are odd, hence invertible mod 2^32); larger changes collide with
    probability ~2^-32."""
    w = _words(x)
    weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.sum(w * weights, dtype=jnp.uint32), finite


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    pairs = [_fingerprint_leaf(x) for x in leaves]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def fingerprint(state: Any) -> tuple[dict[str, int], list[str]]:
    """({array path: fingerprint}, [paths holding non-finite values]) of a (sharded) state, computed on device."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums, finite = jax.device_get(_fingerprints([x for _, x in flat]))
    keys = [_path_key(p) for p, _ in flat]
    return dict(zip(keys, (int(v) for v in sums))), [k for k, ok in zip(keys, finite) if not bool(ok)]


def layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array path: (shape, dtype)} of a state, abstract state or Orbax metadata tree."""
    return {_path_key(p): (tuple(x.shape), str(np.dtype(x.dtype)))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _KeepSteps(ocm.PreservationPolicy):
    """Preserve the steps in a live set: phase ends become known (and grow) after the manager is built, and
    Orbax's CustomSteps copies its steps at construction."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step in self.steps for c in checkpoints]


class CheckpointStore:
    """`<workdir>/checkpoints/<step>`: async saves, keep the latest K plus every phase end; verified restores."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig, phase_ends: tuple[int, ...] = (),
                 read_only: bool = False, typed: bool = True):
        """`typed`: register the state's and meta's handlers (needed to read the layout before a restore);
        a partial restore of params alone (init_from) needs an untyped manager."""
        self.directory = pathlib.Path(directory).absolute()
        self._phase_ends = set(phase_ends)
        preservation = ocm.AnyPreservationPolicy([ocm.LatestN(cfg.keep), _KeepSteps(self._phase_ends)])
        # cleanup_tmp_directories: a save cut short by a kill or a full disk leaves `*.orbax-checkpoint-tmp*`;
        # it is never a checkpoint, so the next writer removes it.
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=cfg.async_save, create=not read_only,
                                               preservation_policy=preservation, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        # Registered handlers make the state's metadata (shapes, dtypes) readable before any save or restore.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers if typed else None,
                                             item_names=None if typed else ("state", "meta"))

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

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def quarantined(self) -> list[str]:
        """Names of the checkpoints moved aside as damaged (`<step>-<reason>`)."""
        folder = self.directory / QUARANTINE
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    # ------------------------------------------------------------------------------------------ save / restore
    def save(self, step: int, state: Any, meta: dict, phase_end: bool = False) -> None:
        """Save asynchronously, recording each array's fingerprint. A non-finite state is refused: written, it
        would count as the newest good checkpoint and `keep` would delete the good ones."""
        sums, bad = fingerprint(state)
        if bad:
            raise NonFiniteState(f"the train state at step {step} holds non-finite values in {bad[:3]}; "
                                 f"not saving it (the checkpoints before it are intact)")
        if phase_end:
            self._phase_ends.add(step)
        meta = dict(meta, step=step, time=time.time(), phase_end=phase_end, versions=versions(), checksums=sums)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract: Any, shardings: Any) -> Any:
        """The state of checkpoint `step`, unverified (see `restore_verified`)."""
        target = with_shardings(abstract, shardings)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def restore_verified(self, step: int, abstract: Any, shardings: Any,
                         check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, checked in the order that tells damage from a config change:
        meta readable; `check_meta(meta)` (the caller's config checks: their ConfigErrors pass through); the
        stored layout equal to `abstract`'s (else a ConfigError); the arrays restore; fingerprints and
        finiteness hold. Failures of Orbax's reads and of the checks on content raise CheckpointDamaged."""
        try:
            meta = self.meta(step)
        except Exception as e:  # noqa: BLE001 - any failure to read what Orbax wrote is damage
            raise CheckpointDamaged(step, "meta", f"{type(e).__name__}: {str(e)[:160]}") from None
        if check_meta is not None:
            try:
                check_meta(meta)
            except (KeyError, TypeError, AttributeError) as e:  # valid JSON without the fields clt writes
                raise CheckpointDamaged(step, "meta", f"{type(e).__name__}: {e}") from None
        try:
            stored = layout(self.manager.item_metadata(step)["state"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointDamaged(step, "metadata", f"{type(e).__name__}: {str(e)[:160]}") from None
        wanted = layout(abstract)
        if stored != wanted:
            diff = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
            k = diff[0]
            holds = f"checkpoint {step} in {self.directory} holds {k} as {stored.get(k, 'nothing')}, "
            if all(d.startswith("params/") or "/mu/" in d or "/nu/" in d for d in diff):
                raise ConfigError("model", meta.get("model", {}).get("preset", "?"),
                                  holds + f"this config's model needs {wanted.get(k, 'nothing')} ({len(diff)} "
                                  "arrays differ)", "restore the model fields the run was started with, or use a "
                                  "new --workdir (--init-from ckpt:OLD_WORKDIR loads weights of the same shape)")
            written_by = meta.get("versions", {}).get("clt", "?")
            raise ConfigError("workdir", str(self.directory.parent),
                              holds + f"this clt's train state has {wanted.get(k, 'nothing')}: it was written by "
                              f"clt {written_by} with another train-state layout",
                              "resume it with that clt version, or start from its weights in a new --workdir "
                              "with --init-from ckpt:WORKDIR")
        try:
            state = self.restore(step, abstract, shardings)
        except Exception as e:  # noqa: BLE001
            raise CheckpointDamaged(step, "unreadable", f"{type(e).__name__}: {str(e)[:160]}") from None
        sums, bad = fingerprint(state)
        if bad:
            raise CheckpointDamaged(step, "nonfinite", f"non-finite values in {bad[:3]}")
        recorded = meta.get("checksums")
        if recorded is not None:
            wrong = sorted(k for k in recorded if sums.get(k) != recorded[k])
            if wrong or recorded.keys() != sums.keys():
                raise CheckpointDamaged(step, "checksum", f"content differs from what was saved in {wrong[:3]}")
        return state, meta

    def quarantine(self, step: int, reason: str) -> pathlib.Path:
        """Move checkpoint `step` to `quarantine/<step>-<reason>` (kept for inspection, never restored)."""
        dest = self.directory / QUARANTINE / f"{step}-{reason}"
        n = 1
        while dest.exists():  # the same step damaged twice (e.g. a run re-saved it): keep both
            dest = self.directory / QUARANTINE / f"{step}-{reason}-{n}"
            n += 1
        if jax.process_index() == 0:
            dest.parent.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"clt-quarantine-{step}")
        self.manager.reload()
        return dest

    def restore_latest(self, abstract: Any, shardings: Any,
                       check_meta: Callable[[dict], None] | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that passes `restore_verified`; damaged ones are moved
        to quarantine with a warning. None when there is no checkpoint at all; NoUsableCheckpoint when every
        one is (or was already) in quarantine, since starting over would overwrite the run's history."""
        steps = self.steps()
        if not steps and self.quarantined():
            raise NoUsableCheckpoint(
                f"{self.directory} holds no checkpoint but damaged ones in quarantine/ "
                f"({', '.join(self.quarantined())}); starting over would overwrite the run's history: inspect "
                "them, or train in a new --workdir")
        if not steps:
            return None
        for step in reversed(steps):
            try:
                state, meta = self.restore_verified(step, abstract, shardings, check_meta)
                damage = None
            except CheckpointDamaged as e:
                damage = e
            # Damage one host sees is every host's: all fall back to the same step (else they would resume
            # from different ones, and the next collective would hang).
            if not hosts_any(damage is not None):
                return step, state, meta
            reason = damage.reason if damage is not None else "damaged-on-another-host"
            dest = self.quarantine(step, reason)
            log.warning("checkpoint %d is damaged (%s); moved to %s, trying the previous one", step,
                        damage or "seen by another process", dest)
        raise NoUsableCheckpoint(f"no usable checkpoint in {self.directory}: every one was damaged and moved to "
                                 f"{self.directory / QUARANTINE} ({', '.join(self.quarantined())}); inspect them, "
                                 f"or start over in a new --workdir")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------------------
# init_from: another run's weights, restored onto this run's shardings.
# ----------------------------------------------------------------------------------------------------------
def parse_init_from(spec: str) -> tuple[str, pathlib.Path, int | None]:
    kind, _, rest = spec.partition(":")
    step = None
    if kind == "ckpt" and "@" in rest:
        rest, _, s = rest.rpartition("@")
        if not s.isdigit():
            raise ConfigError("model.init_from", spec, "the step after @ must be a number", "e.g. ckpt:runs/a@500")
        step = int(s)
    return kind, pathlib.Path(rest), step


def open_source(spec: str, cfg: CheckpointConfig) -> tuple[CheckpointStore, int]:
    """(read-only store, step) of `ckpt:WORKDIR[@STEP]`; WORKDIR may also be a checkpoints/ folder or one
    checkpoint's folder (`.../checkpoints/500`). Close the store when done."""
    _, path, step = parse_init_from(spec)
    if step is None and path.name.isdigit() and path.is_dir() and not (path / "checkpoints").is_dir():
        path, step = path.parent, int(path.name)  # one checkpoint's folder
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not directory.is_dir():
        raise ConfigError("model.init_from", spec, f"no checkpoints at {directory}", "give a clt workdir")
    store = CheckpointStore(directory, cfg, read_only=True, typed=False)
    steps = store.steps()
    if not steps or (step is not None and step not in steps):
        store.close()
        raise ConfigError("model.init_from", spec, f"no checkpoint {step if step is not None else ''} in "
                          f"{directory} (has {steps})", "pick one of those steps")
    return store, step if step is not None else steps[-1]


def source_meta(spec: str, cfg: CheckpointConfig) -> dict:
    """The meta of the checkpoint `ckpt:` names (its config, model record, tokenizer)."""
    store, step = open_source(spec, cfg)
    try:
        return store.meta(step)
    finally:
        store.close()


def source_model_fields(spec: str, cfg: CheckpointConfig) -> dict[str, Any]:
    """The `model.*` architecture fields of an init_from source: a Hugging Face config.json, or the config a
    clt checkpoint was written with (its vocabulary as the run resolved it)."""
    kind, path, _ = parse_init_from(spec)
    if kind == "hf":
        try:
            return model_fields(read_config(path), f"{path}/config.json")
        except HFError as e:
            raise ConfigError("model.init_from", spec, str(e), "give a supported Hugging Face model folder") from None
    return recorded_model_fields(source_meta(spec, cfg))


def recorded_model_fields(meta: dict) -> dict[str, Any]:
    """The architecture fields a checkpoint's meta records: its config's, with the vocabulary the run resolved."""
    model = meta.get("config", {}).get("model", {})
    fields = {k: model[k] for k in ARCH_FIELDS if k in model}
    fields["vocab_size"] = meta.get("model", {}).get("vocab_size", fields.get("vocab_size", 0))
    return fields


def source_tokenizer(spec: str, cfg: CheckpointConfig) -> dict | None:
    """{name, fingerprint} of the tokenizer an init_from source was trained with, or None when it records none."""
    kind, path, _ = parse_init_from(spec)
    if kind == "hf":
        if not (path / "tokenizer.json").is_file():
            return None
        tokenizer = load_tokenizer(str(path))
        return dict(name=tokenizer.name, fingerprint=tokenizer.fingerprint)
    return source_meta(spec, cfg).get("tokenizer")


def load_init_weights(spec: str, dims: ModelDims, abstract_params: Any, shardings: Any, cfg: CheckpointConfig,
                      progress: bool = False) -> Any:
    """Params from a Hugging Face folder, or another run's checkpoint (latest, or @STEP), placed straight into
    this run's shardings."""
    kind, path, _ = parse_init_from(spec)
    if kind == "hf":
        try:
            return load_params(path, dims, abstract_params, shardings, progress=progress)
        except (HFError, SafetensorsError) as e:
            raise ConfigError("model.init_from", spec, str(e), "give a supported Hugging Face model folder") from None
    store, chosen = open_source(spec, cfg)
    target = with_shardings(abstract_params, shardings)
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


def remove_partial_saves(directory: str | pathlib.Path, settle_s: float = 0.5, timeout_s: float = 10.0) -> None:
    """Delete the temporary folders of saves that did not complete (after a failed run, before exit).

    A save the storage refused can still have writes in flight: Orbax gives up at the first error, but tensorstore
    completes the other writes it had started, and they recreate the folders just removed. So when there is
    something to remove, the removal repeats until nothing has reappeared for `settle_s` (at most `timeout_s`)."""
    folder, pattern = pathlib.Path(directory), "*.orbax-checkpoint-tmp*"
    if not any(folder.glob(pattern)):
        return
    deadline = quiet_since = time.monotonic()
    deadline += timeout_s
    while time.monotonic() < deadline:
        found = list(folder.glob(pattern))
        for tmp in found:
            shutil.rmtree(tmp, ignore_errors=True)
        if found:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle_s:
            return
        time.sleep(0.05)


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
    for name in store.quarantined():
        rows.append(dict(step=f"{QUARANTINE}/{name}", phase="?", time="?", size_mb=0, phase_end=False,
                         complete=False))
    return rows


def meta_json(meta: dict) -> str:
    """A checkpoint's meta for people: the per-array fingerprints are summarised as their count."""
    shown = dict(meta)
    if "checksums" in shown:
        shown["checksums"] = f"{len(shown['checksums'])} arrays"
    return json.dumps(shown, indent=1, default=str)


def _preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (jax.distributed started it; it owns SIGTERM then)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


def hosts_any(flag: bool) -> bool:
    """Whether `flag` holds on any process: one decision for all, where each host's own view (its clock, its
    signal, its read of a file) could differ. Every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.array(bool(flag))).any())


def check_shared_workdir(wd: pathlib.Path) -> None:
    """With several processes, process 0 alone writes the run files, the replay snapshots and the checkpoint
    metadata that every process reads back: the workdir must be one folder for all (a shared file system, or
    the bucket a JobSet mounts in every pod). Checked at start, by a file process 0 writes and the others read."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31)))
    probe = wd / f".clt-shared-{token}"
    if jax.process_index() == 0:
        probe.write_text(str(token))
    multihost_utils.sync_global_devices("clt-shared-workdir-written")
    unseen = not (probe.is_file() and probe.read_text() == str(token))
    unshared = hosts_any(unseen)  # also the barrier before process 0 removes the probe
    if jax.process_index() == 0:
        probe.unlink()
    if unshared:
        raise ConfigError("--workdir", str(wd), f"is not one folder for all {jax.process_count()} processes: "
                          f"{'this process' if unseen else 'another process'} cannot see what process 0 wrote there",
                          "put the workdir on a file system every host mounts (on GKE, the bucket the job mounts)")


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0 (preemption-safe).

    One process keeps its own flag (JAX's `reached_preemption_sync_point` needs jax.distributed). Several
    processes leave SIGTERM to JAX's preemption service, which `jax.distributed.initialize` starts: a notice
    reaching any host makes every host stop after the same step, the next one after the furthest host's
    (`agreed` asks it every step, so a short grace period is met). Ctrl-C is still clt's, agreed at log
    boundaries."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}
        self._service = jax.process_count() > 1 and _preemption_service()

    def __enter__(self) -> "Preemption":
        signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, step: int, at_boundary: bool) -> bool:
        """Whether to stop after `step` (every process calls it after every step). One process: as soon as
        asked. Several: when JAX's preemption sync point is reached, or at a log boundary when any host was
        asked (Ctrl-C; SIGTERM too where the preemption service is off)."""
        if jax.process_count() == 1:
            return self.requested
        if self._service:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        return at_boundary and hosts_any(self.requested)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
