"""The persistent replay buffer: a reservoir over the fresh sequences a run trained on, kept on disk.

Design. Algorithm R (Vitter) only needs to know *which* rows were trained, never the model, and the plan says
which rows every step trains. So the reservoir's contents (each slot's domain and the row's draw index in
that domain's stream) are a pure function of (seed, plan, step): `reservoir_at` recomputes them, and
nothing about the buffer needs checkpointing. A kill between checkpoints cannot leave it ahead, and resume
is exact by construction.

Tokens are what must outlive the data: at every phase boundary (while that phase's data still exists) the
reservoir is *materialised* into `<workdir>/replay/step-<s>/`: a memmap of its sequences plus the slot
index, written atomically. An entry's tokens come from its domain's shards when they exist, else from the
previous snapshot, so an old corpus may be deleted once a later phase has started. A phase that replays
from the buffer (`replay=dict(share=r, source="buffer")`) samples the snapshot taken at its own start, i.e.
the data of earlier phases; `replay_buffer.load` points a new run at an exported snapshot instead.
`clt replay` reads a run's buffer from its workdir (`buffer_of_workdir`) and copies it out (`export`).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import shutil
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from clt.checkpoint import CheckpointStore
from clt.config import CheckpointConfig, ConfigError
from clt.data.pipeline import example_index
from clt.data.shards import DomainData, domain_exists, staged_directory, token_dtype
from clt.mixture import MixtureSchedule
from clt.plan import Plan
from clt.resume import PLAN_FILE, read_record

log = logging.getLogger("clt")

FORMAT = 1
_FILES = ("tokens.bin", "domain.npy", "draw.npy", "index.json")


# ----------------------------------------------------------------------------------------------------------
# The reservoir: slot contents as a pure function of (seed, plan, step).
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Reservoir:
    capacity: int
    seen: int
    """Fresh rows offered so far."""
    domain: np.ndarray
    """int32 [capacity]: domain index of each slot's row; -1 = empty."""
    draw: np.ndarray
    """int64 [capacity]: the row's draw index k in its domain's stream (example = perm_{d,e}(k mod N_d))."""

    @staticmethod
    def empty(capacity: int) -> "Reservoir":
        return Reservoir(capacity, 0, np.full(capacity, -1, np.int32), np.zeros(capacity, np.int64))

    @property
    def fill(self) -> int:
        return min(self.seen, self.capacity)

    def offer(self, domains: np.ndarray, draws: np.ndarray, u: np.ndarray) -> None:
        """Algorithm R over rows in order: row n (0-based) fills slot n while the buffer is not full, then
        replaces slot j = floor(u x (n + 1)) when j < capacity, so each row seen is kept with probability
        capacity / rows seen. Row n's slot depends only on (n, u), never on the buffer, so all rows are placed
        at once: each slot ends with the last row that chose it, exactly as the sequential loop would leave it."""
        m = len(domains)
        if m == 0:
            return
        n = self.seen + np.arange(m, dtype=np.int64)
        j = np.where(n < self.capacity, n, np.floor(np.asarray(u) * (n + 1)).astype(np.int64))
        chosen = np.flatnonzero(j < self.capacity)
        slots = j[chosen]
        _, from_end = np.unique(slots[::-1], return_index=True)
        last = chosen[len(chosen) - 1 - from_end]  # the last row choosing each slot wins
        self.domain[j[last]], self.draw[j[last]] = np.asarray(domains)[last], np.asarray(draws)[last]
        self.seen += m


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (SplitMix64's finaliser), vectorised: buffer picks per draw index.
    Array arithmetic on uint64 wraps silently, which is what the hash wants."""
    z = np.asarray(x, np.uint64).reshape(-1) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=16)
def _pick_key(seed: int) -> np.uint64:
    return splitmix64(np.array([seed + 0xB0FF], np.uint64))[0]


def _step_uniforms(seed: int, step: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5E5E, step]).random(n)


def reservoir_at(plan: Plan, capacity: int, step: int, start: tuple[int, Reservoir] | None = None,
                 mixture: MixtureSchedule | None = None) -> Reservoir:
    """The reservoir after `step` updates (fresh rows of steps [0, step)), continuing from `start`
    = (step0, reservoir after step0 updates) when given."""
    mixture = mixture or MixtureSchedule(plan)
    s0, res = start if start is not None else (0, Reservoir.empty(capacity))
    res = Reservoir(res.capacity, res.seen, res.domain.copy(), res.draw.copy())
    D = len(plan.domains)
    for s in range(s0, step):
        slots, draws = mixture.rows_at(s)
        fresh = slots < D  # replayed rows are never offered: the buffer holds what was learned fresh
        res.offer(slots[fresh], draws[fresh], _step_uniforms(plan.seed, s, int(fresh.sum())))
    return res


# ----------------------------------------------------------------------------------------------------------
# Snapshots: a materialised reservoir on disk (also the export format).
# ----------------------------------------------------------------------------------------------------------
class BufferSnapshot:
    """A reservoir's sequences on disk: `tokens.bin` [fill, seq_len + 1] memmap, slot domains and draws."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise ConfigError("replay_buffer.load", str(self.path), "not a replay buffer (no index.json)",
                              "give a folder written by `clt replay export`")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ConfigError("replay_buffer.load", str(self.path), f"buffer format {self.index.get('format')}",
                              f"re-export it with this clt (format {FORMAT})")
        self.fill, self.seq_len = int(self.index["fill"]), int(self.index["seq_len"])
        self.domains: list[str] = list(self.index["domains"])
        self.domain = np.load(self.path / "domain.npy")
        self.draw = np.load(self.path / "draw.npy")
        dtype = np.dtype(self.index["dtype"])
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(self.fill, self.seq_len + 1))
        self._rows = self.tokens.view(np.ndarray)  # same mapping; indexing skips memmap's per-call wrapping

    @property
    def capacity(self) -> int:
        return int(self.index["capacity"])

    def composition(self) -> dict[str, int]:
        counts = np.bincount(self.domain, minlength=len(self.domains))
        return {d: int(c) for d, c in zip(self.domains, counts)}

    def rows_for_draws(self, draws: np.ndarray, seed: int) -> np.ndarray:
        """Tokens for buffer draws k: entry hash(seed, k) mod fill, uniform over the buffer."""
        if self.fill == 0:
            raise ValueError(f"the replay buffer at {self.path} is empty")
        picks = splitmix64(np.asarray(draws, np.uint64) ^ _pick_key(seed)) % np.uint64(self.fill)
        return self._rows[picks.astype(np.int64)].astype(np.int32)

    def lookup(self) -> dict[tuple[str, int], int]:
        """(domain name, draw) -> row, to carry entries whose data is gone into the next snapshot."""
        return {(self.domains[int(d)], int(k)): i for i, (d, k) in enumerate(zip(self.domain, self.draw))}

    def holds(self, res: Reservoir, plan: Plan) -> bool:
        """Whether this snapshot materialises exactly `res` (same slots: domain names and draws) for `plan`."""
        if (self.capacity, int(self.index["seen"]), self.seq_len, self.index.get("seed")) != (
                res.capacity, res.seen, plan.seq_len, plan.seed) or self.fill != res.fill:
            return False
        names = np.array(self.domains, dtype=object)[self.domain] if self.fill else np.array([], dtype=object)
        wanted = np.array(plan.domains, dtype=object)[res.domain[:res.fill]] if res.fill else names
        return bool(np.array_equal(names, wanted) and np.array_equal(self.draw, res.draw[:res.fill]))

    def check_compatible(self, seq_len: int, vocab_size: int, tokenizer: str) -> None:
        """A loaded buffer must match the run: same sequence length and tokenizer."""
        if self.seq_len != seq_len:
            raise ConfigError("replay_buffer.load", str(self.path), f"buffer sequences have seq_len {self.seq_len}, "
                              f"the run uses {seq_len}", "set data.seq_len to match, or export a matching buffer")
        if self.index["vocab_size"] != vocab_size or self.index["tokenizer"] != tokenizer:
            raise ConfigError("replay_buffer.load", str(self.path),
                              f"buffer tokenizer {self.index['tokenizer']!r} (vocab {self.index['vocab_size']}) "
                              f"differs from the run's {tokenizer!r} (vocab {vocab_size})",
                              "replay needs the same tokenizer; prepare the data with the buffer's tokenizer")


def materialise(res: Reservoir, plan: Plan, step: int, data: Mapping[str, DomainData],
                previous: BufferSnapshot | None, out: str | pathlib.Path) -> BufferSnapshot:
    """Write the reservoir's sequences to `out` (atomically). Entries come from their domain's shards when the
    data is present, else from `previous` (the snapshot they were carried in)."""
    fill, L = res.fill, plan.seq_len
    domains = list(plan.domains)
    present = {i: data[d] for i, d in enumerate(domains) if d in data}
    some = next(iter(data.values()))
    vocab, tokenizer = some.vocab_size, some.tokenizer
    carried = previous.lookup() if previous is not None else {}
    dtype = token_dtype(vocab)
    with staged_directory(out, replaceable=_FILES) as tmp:
        tokens = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="w+", shape=(max(fill, 1), L + 1))
        resident = np.array([int(d) in present for d in res.domain[:fill]], bool)
        for d, domain in present.items():  # one batched read per domain (one round trip on a bucket)
            rows = np.flatnonzero(resident & (res.domain[:fill] == d))
            if rows.size:
                n = domain.train.num_sequences(L)
                idx = [example_index(plan.seed, domains[d], int(k), n) for k in res.draw[rows]]
                tokens[rows] = domain.train.sequences(np.array(idx, np.int64), L)
        for i in np.flatnonzero(~resident).tolist():
            d, k = int(res.domain[i]), int(res.draw[i])
            if (domains[d], k) in carried:
                tokens[i] = previous.tokens[carried[(domains[d], k)]]
            else:
                raise ConfigError(f"data.domains.{domains[d]}", None, "its data is gone and the replay buffer "
                                  "holds rows of it that no earlier snapshot materialised",
                                  "restore the domain's prepared data until the buffer has been materialised")
        tokens.flush()
        del tokens
        np.save(tmp / "domain.npy", res.domain[:fill])
        np.save(tmp / "draw.npy", res.draw[:fill])
        (tmp / "index.json").write_text(json.dumps(dict(
            format=FORMAT, step=step, capacity=res.capacity, seen=res.seen, fill=fill, seq_len=L,
            dtype=str(np.dtype(dtype)), vocab_size=vocab, tokenizer=tokenizer, domains=domains, seed=plan.seed,
            plan_digest=plan.digest()), indent=1))
    return BufferSnapshot(out)


class ReplayBuffer:
    """A run's buffer: snapshots under `<workdir>/replay/step-<s>/`, recomputed from the plan when missing."""

    def __init__(self, root: str | pathlib.Path, plan: Plan, capacity: int, data: Mapping[str, DomainData]):
        self.root, self.plan, self.capacity, self.data = pathlib.Path(root), plan, capacity, data
        self.mixture = MixtureSchedule(plan)

    def snapshot_steps(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if (p / "index.json").exists())

    def snapshot(self, step: int) -> BufferSnapshot:
        """The buffer after `step` updates, materialised on first use. A snapshot on disk is reused only when
        it holds exactly the reservoir this plan gives at `step` (a run restarted with another plan or seed, or
        --accept-changed-past, makes it stale); a stale one is rebuilt (which needs its data to exist)."""
        path = self.root / f"step-{step}"
        existing = BufferSnapshot(path) if (path / "index.json").exists() else None
        earlier = [s for s in self.snapshot_steps() if s < step]
        previous = BufferSnapshot(self.root / f"step-{earlier[-1]}") if earlier else None
        start = None
        if previous is not None:
            res0 = Reservoir(self.capacity, int(previous.index["seen"]), np.full(self.capacity, -1, np.int32),
                             np.zeros(self.capacity, np.int64))
            index_now = np.array([self.plan.domains.index(d) for d in previous.domains], np.int32)
            res0.domain[:previous.fill], res0.draw[:previous.fill] = index_now[previous.domain], previous.draw
            start = (earlier[-1], res0)
        res = reservoir_at(self.plan, self.capacity, step, start, self.mixture)
        if existing is not None:
            if existing.holds(res, self.plan):
                return existing
            log.warning("replay snapshot %s does not match this plan (another seed, plan or capacity); rebuilding",
                        path)
        return materialise(res, self.plan, step, self.data, previous, path)


# ----------------------------------------------------------------------------------------------------------
# A finished or running workdir's buffer, from its files alone (`clt replay info WORKDIR`, `clt replay export`).
# ----------------------------------------------------------------------------------------------------------
def buffer_of_workdir(workdir: str | pathlib.Path) -> tuple[ReplayBuffer, int] | None:
    """(the run's buffer, the step of its latest checkpoint), read from plan.json (the plan and config that ran)
    and checkpoints/; None when the run keeps no buffer (replay_buffer.capacity = 0). The buffer reads the
    domains whose data still exists; `buffer.snapshot(step)` is the buffer as that checkpoint saw it.

    ConfigError when `workdir` has no plan.json or no checkpoint yet."""
    path = pathlib.Path(workdir)
    if not (path / PLAN_FILE).exists():
        raise ConfigError("path", str(path), "neither a replay buffer (index.json) nor a clt workdir (plan.json)",
                          "give an exported buffer folder or a run's --workdir")
    record = read_record(path)
    capacity = record.config.replay_buffer.capacity
    if not capacity:
        return None
    store = CheckpointStore(path / "checkpoints", CheckpointConfig(), read_only=True)
    step = store.latest_step()
    store.close()
    if step is None:
        raise ConfigError("path", str(path), "has no checkpoint yet", "train first; the buffer follows the checkpoints")
    data = {d: DomainData(p) for d, p in record.config.data.domains if domain_exists(p)}
    return ReplayBuffer(path / "replay", record.plan, capacity, data), step


def export(workdir: str | pathlib.Path, out: str | pathlib.Path) -> BufferSnapshot | None:
    """Copy a run's buffer at its latest checkpoint (materialised first if needed) to the new folder `out`,
    whole or not at all (copied aside, then renamed); a run with `replay_buffer.load=OUT` samples it. Returns
    the exported snapshot (its `index["step"]` is the checkpoint's step), or None when the run keeps no buffer.

    ConfigError as `buffer_of_workdir`, or when `out` already exists."""
    found = buffer_of_workdir(workdir)
    if found is None:
        return None
    buffer, step = found
    snap = buffer.snapshot(step)
    out = pathlib.Path(out)
    if out.exists():
        raise ConfigError("OUT", str(out), "already exists", "choose a new folder")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(snap.path, tmp)
    tmp.rename(out)
    return BufferSnapshot(out)
