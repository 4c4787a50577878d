"""The input pipeline: the batch of any step as a pure function of (seed, plan, step), prefetched by grain.

mixture.py says which slot (fresh domain, replayed domain, buffer) fills each row of a step and the row's
draw index k within its domain's stream. Here the k-th draw of domain d becomes example perm_{d,e}(k mod N_d)
with epoch e = k div N_d: grain's `index_shuffle` gives a fresh O(1)-memory permutation of the domain's N_d
sequences each epoch. Nothing is stateful, so resuming at step s is just starting the range at s, and each
host builds only its own slice of the rows.
"""

from __future__ import annotations

import collections
import functools
import zlib
from typing import Callable, Iterator, Mapping

import grain
import numpy as np

from clt.config import Config, ConfigError
from clt.data.shards import DomainData, domain_exists
from clt.mixture import MixtureSchedule, slot_names
from clt.plan import PhasePlan, Plan

_SHUFFLE_ROUNDS = 4


@functools.lru_cache(maxsize=4096)
def _epoch_seed(seed: int, domain: str, epoch: int) -> int:
    # Keyed by the domain's name, not its index: adding a domain later must not reshuffle the others.
    return int(np.random.SeedSequence([seed, zlib.crc32(domain.encode()), epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def example_index(seed: int, domain: str, k: int, n: int) -> int:
    """The k-th draw of a domain of n sequences: a fresh permutation every epoch (k div n)."""
    epoch, i = divmod(int(k), n)
    return int(grain.experimental.index_shuffle(i, n - 1, _epoch_seed(seed, domain, epoch), _SHUFFLE_ROUNDS))


def check_sequences_fit(data: Mapping[str, DomainData], seq_len: int) -> None:
    """Every domain's training split holds at least one sequence of seq_len + 1 tokens (else a ConfigError)."""
    for d, domain in data.items():
        n = domain.train.num_tokens
        if n < seq_len + 1:
            raise ConfigError("data.seq_len", seq_len, f"domain {d!r} has {n} training tokens, fewer than seq_len + 1",
                              f"set data.seq_len <= {n - 1}, or prepare more text for it")


def load_domains(cfg: Config) -> dict[str, DomainData]:
    """The declared domains whose prepared data exists (a domain only past phases used may be deleted);
    their sequences fit `seq_len` and they share one tokenizer."""
    data = {name: DomainData(path) for name, path in cfg.data.domains if domain_exists(path)}
    if not data:
        name, path = cfg.data.domains[0]
        DomainData(path)  # raises the ShardError that says to run `clt prepare`
    check_sequences_fit(data, cfg.data.seq_len)
    # The fingerprint, not the name, says which ids a store holds (the same path may hold another tokenizer).
    first, *others = data.items()
    for name, domain in others:
        if (domain.tokenizer, domain.tokenizer_fingerprint) != (first[1].tokenizer, first[1].tokenizer_fingerprint):
            raise ConfigError(f"data.domains.{name}", domain.path,
                              f"prepared with tokenizer {domain.tokenizer} ({domain.tokenizer_fingerprint}), but "
                              f"data.domains.{first[0]} with {first[1].tokenizer} ({first[1].tokenizer_fingerprint})",
                              "prepare every domain with the same --tokenizer")
    return data


def check_data_needed(plan: Plan, data: Mapping[str, DomainData], start: int, cfg: Config) -> None:
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


def data_manifest(cfg: Config, data: Mapping[str, DomainData]) -> dict[str, str]:
    """Each present domain's content hash: a resume refuses data that changed under a phase that ran."""
    return {name: data[name].manifest_hash() for name, _ in cfg.data.domains if name in data}


class BatchSource:
    """Builds the token rows of any step for one host (rows [h*B/H, (h+1)*B/H) of the step's batch)."""

    def __init__(self, plan: Plan, data: Mapping[str, DomainData], *, buffer=None, host: int = 0,
                 hosts: int = 1):
        self.plan, self.mixture = plan, MixtureSchedule(plan)
        # Domains whose data is gone (only past phases used them) have no shard; the plan never draws them.
        self.shards = [data[d].train if d in data else None for d in plan.domains]
        check_sequences_fit(data, plan.seq_len)
        self.sizes = [s.num_sequences(plan.seq_len) if s is not None else 0 for s in self.shards]
        self.buffer, self.host, self.hosts = buffer, host, hosts
        self.names = slot_names(plan.domains)
        for p in plan.phases:
            if p.batch_size % hosts:
                raise ConfigError(f"phases.{p.name}.batch_size", p.batch_size, f"does not split over {hosts} hosts",
                                  f"use a multiple of {hosts}")

    def host_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, draw index) of this host's rows at `step`."""
        slots, draws = self.mixture.rows_at(step)
        per_host = len(slots) // self.hosts
        sl = slice(self.host * per_host, (self.host + 1) * per_host)
        return slots[sl], draws[sl]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{"tokens": int32 [B/H, seq_len + 1], "slots": int32 [B/H]} of this host's rows at `step`."""
        slots, draws = self.host_rows(step)
        D, L = len(self.plan.domains), self.plan.seq_len
        tokens = np.empty((len(slots), L + 1), np.int32)
        from_buffer = slots == 2 * D
        seed, names = self.plan.seed, self.plan.domains
        # One batched read per domain, all started before any is awaited: on a bucket they overlap.
        reads = []
        for d in np.unique(slots[~from_buffer] % D).tolist():  # fresh slot d and replay slot D + d: domain d
            rows = np.flatnonzero(~from_buffer & (slots % D == d))
            idx = [example_index(seed, names[d], k, self.sizes[d]) for k in draws[rows].tolist()]
            reads.append((rows, self.shards[d].read_sequences(np.array(idx, np.int64), L)))
        for rows, pending in reads:
            tokens[rows] = pending.result()
        if from_buffer.any():
            if self.buffer is None:
                raise RuntimeError(f"step {step} replays from the buffer, but no buffer snapshot is set")
            tokens[from_buffer] = self.buffer.rows_for_draws(draws[from_buffer], self.plan.seed)
        return {"tokens": tokens, "slots": slots.astype(np.int32)}

    def row_counts(self, steps: range) -> dict[str, int]:
        """`rows/<domain>` (fresh) and `rows/replay/<domain>` (replayed) counts of the whole batch's rows over
        `steps`, every host's (recomputed from the mixture, so a resumed run logs exactly what an uninterrupted
        one does, and a run of several processes what one process does)."""
        slots = np.concatenate([self.mixture.rows_at(s)[0] for s in steps])
        counts = np.bincount(slots, minlength=len(self.names))
        return {f"rows/{n}": int(c) for n, c in zip(self.names, counts) if c or not n.startswith("replay/")}


def iterate(source: BatchSource, start: int, stop: int, prefetch: int,
            before_phase: Callable[[PhasePlan], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(step, host batch) for steps [start, stop), built ahead by grain's loader threads, one phase at a time:
    `before_phase(p)` runs before any batch of phase p is built (it sets the phase's replay-buffer snapshot)."""
    for p in source.plan.phases:
        lo, hi = max(start, p.start), min(stop, p.end)
        if lo >= hi:
            continue
        if before_phase is not None:
            before_phase(p)
        ds = grain.MapDataset.range(lo, hi).map(lambda s: (int(s), source.batch(int(s))))
        yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))


def device_prefetch(it: Iterator[tuple[int, dict]], put, depth: int = 2) -> Iterator[tuple[int, object]]:
    """(step, device batch) with `depth` batches already sent to the devices ahead of the step (transfers are
    asynchronous, so they overlap the running step)."""
    queue: collections.deque = collections.deque()
    for step, batch in it:
        queue.append((step, put(batch)))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
