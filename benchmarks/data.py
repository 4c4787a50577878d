"""Data throughput: `clt prepare` tokens/s per worker count, and batches/s read back from a local folder and from
S3, next to the rate at which the demo model's train step consumes batches.

    python benchmarks/data.py [--quick] [--corpus-mb 64] [--workers 1 2 4] [--parts 16] [--tokenizer PATH ...]
        [--data data/demo] [--demo-mb 3] [--batch 16] [--seq-len 256] [--batches 200] [--repeats 5]
        [--warmup 3] [--steps 10] [--no-s3] [--out FILE.json]

1. prepare: a JSONL corpus of real text (this Python's standard-library sources, each file one {"text": ...}
   record, cycled with a copy number until it holds --corpus-mb MB) in a temporary folder, prepared by
   `clt.data.prepare.prepare("jsonl", ...)` with each worker count into a fresh output, in --parts parts (so
   there are several per worker). Wall time covers the whole prepare (worker start-up and assembly included);
   tokens/s is all tokens written over that time. The output trees of all worker counts are hashed and must be
   identical. One timing per worker count: a prepare takes long enough that the machine's noise is small next
   to it (the load average is recorded).
2. read: the demo data (--data, else the demo prepared into the temporary folder) under a 2-phase plan like
   benchmarks/replay.py's (prose, then code with 25% mixture replay of prose); the second phase's steps are
   read as `BatchSource.batch(step)` in one thread ("build") and through the trainer's pipeline (grain's loader
   threads + device transfer, `iterate` + `device_prefetch`), from the local folder and from the same files
   copied into a local moto S3 server started here. Each measurement starts with an empty tensorstore chunk
   cache (a new `store.context()`, which holds the 256 MiB cache pool): the first pass is "cold", the median
   of the --repeats later passes is "warm". Local cold reads still hit the OS page cache (the files were just
   written): it is a cold tensorstore cache, not a cold disk.
3. step: the demo model's train step at the same batch and seq_len (benchmarks/step.py's `build`), median
   after warmup -> steps/s; the ratio pipeline batches/s / step steps/s says how far the input pipeline is
   from starving the step (target >= 10x). The two are timed apart: in training they share the CPU.

Results go to benchmarks/results/data-<UTC stamp>.json (or --out) with the command and the machine, as every
benchmark here records them; the last line printed is a one-line JSON summary.

The prepare workers are spawned processes that re-import this file as `__mp_main__`, so its top level imports
only what `clt prepare` itself needs: JAX and the other benchmarks' helpers are imported inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Any, Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from clt.data import inputs, prepare, store  # noqa: E402
from clt.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

DOMAINS = ("prose", "code")  # the two domains the read plan draws from
S3_BUCKET = "clt-bench"
# The "streaming" read's chunk cache: room for the shard indices and a couple of 64 KiB token chunks, not for
# the data, so nearly every row misses, as it does when a corpus is much larger than clt's 256 MiB cache.
STREAMING_CACHE_BYTES = 128 << 10
CLT_CONTEXT = store.context  # clt's own, one per process (lru_cache'd): cleared to empty its cache
# Options whose default depends on --quick: (default, quick).
SIZED = {"corpus_mb": (64.0, 8.0), "workers": ([1, 2, 4], [1, 2]), "demo_mb": (3.0, 1.0), "batches": (200, 50),
         "repeats": (5, 3), "warmup": (3, 2), "steps": (10, 5)}


# ----------------------------------------------------------------------------------------------------------
# 1. Prepare throughput.
# ----------------------------------------------------------------------------------------------------------
def stdlib_sources() -> list[pathlib.Path]:
    """This Python's standard-library .py files, sorted: real text that every install has (no download)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def write_corpus(path: pathlib.Path, target_bytes: int) -> dict[str, int]:
    """A JSONL file of {"text": source file} records, cycling over the sources until it holds target_bytes.
    Repeated passes get a first line naming the copy, so no two documents are identical (the eval split is
    drawn from each document's text)."""
    sources = [s for s in (_read_text(p) for p in stdlib_sources()) if s and s.strip()]
    docs = size = 0
    with path.open("w", encoding="utf-8") as f:
        while size < target_bytes:
            copy, text = divmod(docs, len(sources))[0], sources[docs % len(sources)]
            line = json.dumps({"text": f"# copy {copy}\n{text}" if copy else text}, ensure_ascii=False) + "\n"
            f.write(line)
            docs, size = docs + 1, size + len(line.encode("utf-8"))
    return {"bytes": size, "docs": docs, "source_files": len(sources)}


def _read_text(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def tree_hash(root: pathlib.Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order: equal iff the trees are identical."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def time_prepare(corpus: pathlib.Path, out: pathlib.Path, tokenizer: str, workers: int, part_bytes: int) -> dict:
    """One prepare into a fresh `out`: wall seconds, tokens/s (total and per worker) and the output's hash.
    The output is deleted afterwards (a 64 MB corpus makes ~128 MB of uint16 tokens per run)."""
    t0 = time.perf_counter()
    summary = prepare.prepare("jsonl", [str(corpus)], domain="bench", tokenizer=tokenizer, out=str(out),
                              workers=workers, part_bytes=part_bytes, progress=False)
    wall = time.perf_counter() - t0
    tokens = summary["train"]["tokens"] + summary["eval"]["tokens"]
    result = dict(tokenizer=tokenizer, workers=workers, wall_s=wall, tokens=tokens,
                  docs=summary["train"]["docs"] + summary["eval"]["docs"], tokens_per_s=tokens / wall,
                  tokens_per_s_per_worker=tokens / wall / workers, sha256=tree_hash(out))
    shutil.rmtree(out)
    return result


def train_bpe(corpus: pathlib.Path, out: pathlib.Path, vocab_size: int = 16384, sample_bytes: int = 4 << 20) -> str:
    """A byte-level BPE tokenizer.json trained on the corpus's first `sample_bytes` (the `tokenizers` package):
    what a real model's tokenizer costs per token, without downloading one."""
    import tokenizers

    texts, size = [], 0
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= sample_bytes:
                break
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = out / "bpe-tokenizer.json"
    tok.save(str(path))
    return str(path)


def bench_prepare(args: argparse.Namespace, tmp: pathlib.Path) -> dict:
    """Prepare throughput per tokenizer and worker count, and whether all worker counts wrote the same bytes."""
    corpus = tmp / "corpus.jsonl"
    t0 = time.perf_counter()
    info = write_corpus(corpus, int(args.corpus_mb * 1e6))
    info["write_s"] = time.perf_counter() - t0
    part_bytes = math.ceil(info["bytes"] / args.parts)
    info["parts"] = len(inputs.plan_parts("jsonl", [str(corpus)], part_bytes=part_bytes))
    runs, identical = [], {}
    tokenizers = [train_bpe(corpus, tmp) if t == "bpe" else t for t in args.tokenizer]
    for tokenizer in ["byte", *tokenizers]:
        mine = [time_prepare(corpus, tmp / f"prepared-{w}", tokenizer, w, part_bytes) for w in args.workers]
        identical[tokenizer] = len({r["sha256"] for r in mine}) == 1
        runs += mine
        for r in mine:
            print(f"prepare {tokenizer} workers={r['workers']}: {r['wall_s']:.1f} s, {r['tokens_per_s'] / 1e6:.2f}M "
                  f"tok/s", flush=True)
    corpus.unlink()
    return dict(corpus=info, part_bytes=part_bytes, runs=runs, identical=identical)


# ----------------------------------------------------------------------------------------------------------
# 2. Read throughput, local and S3.
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, Any]]:
    """A local S3 server with bucket S3_BUCKET, started as the tests start theirs (tests/objstores.py), with the
    AWS_* variables tensorstore needs set while it runs (store.kvstore_spec reads them when a store is opened,
    so this runs before any store is)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from objstores import moto_server

    with moto_server(S3_BUCKET) as s3:
        yield dict(endpoint=s3.endpoint, start_s=s3.start_s)


def demo_data(args: argparse.Namespace, tmp: pathlib.Path) -> dict:
    """The prepared demo to read: --data when it holds both domains, else the demo prepared into `tmp`."""
    from clt.data.shards import domain_exists

    if all(domain_exists(store.join(args.data, d)) for d in DOMAINS):
        return dict(path=args.data, prepared_here=False)
    path, max_bytes = str(tmp / "demo"), int(args.demo_mb * 1e6)
    t0 = time.perf_counter()
    prepare.prepare_demo(path, progress=False, max_bytes=max_bytes)
    return dict(path=path, prepared_here=True, max_bytes=max_bytes, prepare_s=time.perf_counter() - t0)


def upload(local: str, remote: str) -> dict:
    """Copy the prepared domains' objects, byte for byte, from the local folder to the bucket prefix."""
    t0, size, objects = time.perf_counter(), 0, 0
    for d in DOMAINS:
        for key in store.list_keys(store.join(local, d)):
            data = store.read_bytes(store.join(local, d), key)
            store.write_bytes(store.join(remote, d), key, data)
            size, objects = size + len(data), objects + 1
    return dict(url=remote, bytes=size, objects=objects, upload_s=time.perf_counter() - t0)


def empty_cache(limit_bytes: int | None = None) -> None:
    """Make the stores opened from now on use a new, empty chunk cache: clt's own context (256 MiB), or with
    `limit_bytes` one of that size (store.context() is swapped for a child context that overrides only the
    cache pool, keeping clt's request retries)."""
    import tensorstore as ts

    CLT_CONTEXT.cache_clear()
    if limit_bytes is None:
        store.context = CLT_CONTEXT
        return
    small = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": limit_bytes}}), CLT_CONTEXT())
    store.context = lambda: small


def fresh_source(root: str, args: argparse.Namespace, cache_bytes: int | None = None) -> tuple[Any, range, float]:
    """(BatchSource, the replay phase's steps, seconds to open the data) with an empty chunk cache (see
    empty_cache): the domains are reopened in a new context."""
    from replay import make_plan  # benchmarks/replay.py
    from clt.data.pipeline import BatchSource
    from clt.data.shards import DomainData

    empty_cache(cache_bytes)
    t0 = time.perf_counter()
    data = {d: DomainData(store.join(root, d)) for d in DOMAINS}
    open_s = time.perf_counter() - t0
    plan = make_plan(root, args.batch, args.seq_len, args.batches, 0.25)
    return BatchSource(plan, data), range(plan.phases[1].start, plan.phases[1].end), open_s


def build_times(source: Any, steps: range) -> list[float]:
    """Seconds of each `BatchSource.batch(step)` in the calling thread (no prefetch, no overlap)."""
    times = []
    for s in steps:
        t0 = time.perf_counter()
        source.batch(s)
        times.append(time.perf_counter() - t0)
    return times


def bench_reads(root: str, args: argparse.Namespace) -> dict:
    """Cold, warm and streaming batches/s of the single-threaded build and of the whole pipeline, from `root`.
    The demo's few MB fit the cache, so a cold pass turns warm after a few batches: the streaming pass, on a
    cache too small for the data, is what a corpus much larger than the cache sees on every batch."""
    import jax
    from replay import time_pipeline  # benchmarks/replay.py
    from step import stats  # benchmarks/step.py

    put = lambda b: jax.device_put(b["tokens"])  # noqa: E731  (as in clt train, one host)
    result: dict[str, Any] = {}
    source, steps, result["open_s"] = fresh_source(root, args)
    cold = build_times(source, steps)
    warm = stats([sum(build_times(source, steps)) / len(steps) for _ in range(args.repeats)])
    source, steps, _ = fresh_source(root, args, STREAMING_CACHE_BYTES)
    streaming = build_times(source, steps)
    result["build"] = dict(cold_batches_per_s=len(steps) / sum(cold), cold_first_batch_s=cold[0],
                           warm_batches_per_s=1 / warm["median"], streaming_batches_per_s=len(steps) / sum(streaming),
                           cold_per_batch_s=stats(cold), warm_per_batch_s=warm, streaming_per_batch_s=stats(streaming))
    source, steps, _ = fresh_source(root, args)
    cold_s = time_pipeline(source, steps, put)
    warm = stats([time_pipeline(source, steps, put) for _ in range(args.repeats)])
    source, steps, _ = fresh_source(root, args, STREAMING_CACHE_BYTES)
    streaming_s = time_pipeline(source, steps, put)
    empty_cache()  # back to clt's own context
    result["pipeline"] = dict(cold_batches_per_s=1 / cold_s, warm_batches_per_s=1 / warm["median"],
                              streaming_batches_per_s=1 / streaming_s, cold_per_batch_s=cold_s,
                              warm_per_batch_s=warm, streaming_per_batch_s=streaming_s)
    return result


def bench_read(args: argparse.Namespace, tmp: pathlib.Path, s3: dict | None) -> dict:
    """Read throughput from the local demo and, when a server runs, from its copy on S3."""
    import jax
    import numpy as np

    jax.block_until_ready(jax.device_put(np.zeros((args.batch, args.seq_len + 1), np.int32)))  # backend up
    data = demo_data(args, tmp)
    result = dict(data=data, local=bench_reads(data["path"], args))
    print(f"read local: pipeline {result['local']['pipeline']['warm_batches_per_s']:.0f} batches/s warm", flush=True)
    if s3 is not None:
        s3 = dict(s3, **upload(data["path"], f"s3://{S3_BUCKET}/demo"))
        result["s3"] = dict(server=s3, **bench_reads(s3["url"], args))
        print(f"read s3: pipeline {result['s3']['pipeline']['warm_batches_per_s']:.0f} batches/s warm", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# 3. The train step that consumes the batches.
# ----------------------------------------------------------------------------------------------------------
def bench_step(args: argparse.Namespace) -> dict:
    """The demo model's train step at the read benchmark's batch and seq_len: median seconds after warmup."""
    import jax
    from clt import sharding
    from step import build, stats  # benchmarks/step.py

    t0 = time.perf_counter()
    bench = build("demo", args.batch, args.seq_len, steps=args.warmup + args.steps + 1)
    batches = bench.batches(2)
    state, times = bench.state, []
    with sharding.use_mesh(bench.mesh):
        for i in range(1 + args.warmup + args.steps):  # call 0 compiles
            t = time.perf_counter()
            state, metrics = bench.step_fn(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
            if i == 0:
                first_s = time.perf_counter() - t0
            elif i > args.warmup:
                times.append(time.perf_counter() - t)
    step_s = stats(times)
    return dict(preset="demo", build_and_first_step_s=first_s, step_s=step_s, steps_per_s=1 / step_s["median"])


def ratios(read: dict, step: dict) -> dict:
    """Pipeline batches/s over the step's steps/s, per storage and cache state (>= 10 keeps the step fed)."""
    return {where: {state: read[where]["pipeline"][f"{state}_batches_per_s"] / step["steps_per_s"]
                    for state in ("cold", "warm", "streaming")}
            for where in ("local", "s3") if where in read}


# ----------------------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: about a minute on 2 CPU cores")
    ap.add_argument("--corpus-mb", type=float, help="JSONL corpus size (default 64, quick 8)")
    ap.add_argument("--workers", type=int, nargs="+", help="prepare worker counts (default 1 2 4, quick 1 2)")
    ap.add_argument("--parts", type=int, default=16, help="parts the corpus is cut into (part_bytes = size/parts)")
    ap.add_argument("--tokenizer", action="append", default=[],
                    help="also prepare with this Hugging Face tokenizer.json or model folder, or 'bpe' for a "
                         "byte-level BPE (16k vocab) trained here on the corpus (repeatable)")
    ap.add_argument("--data", default="data/demo", help="prepared demo data; prepared into a temporary folder "
                                                        "when it lacks prose/ and code/")
    ap.add_argument("--demo-mb", type=float, help="text per demo domain when preparing it here (default 3, quick 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, help="batches per read pass (default 200, quick 50)")
    ap.add_argument("--repeats", type=int, help="warm read passes (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed train steps after compiling (default 3, quick 2)")
    ap.add_argument("--steps", type=int, help="timed train steps (default 10, quick 5)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 server and its reads")
    ap.add_argument("--out", help="result JSON file or folder (default benchmarks/results/, git-ignored; "
                                  "file data-<UTC stamp>.json)")
    args = ap.parse_args(argv)
    for name, (default, quick) in SIZED.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if min(args.workers) < 1 or args.parts < 1 or args.batches < 1 or args.repeats < 1 or args.steps < 1:
        ap.error("--workers, --parts, --batches, --repeats and --steps must be positive")
    for path in (t for t in args.tokenizer if t != "bpe"):  # a bad path fails now, not after minutes of work
        try:
            load_tokenizer(path)
        except TokenizerError as e:
            ap.error(f"--tokenizer {path}: {e}")
    return args


def s3_unavailable() -> str | None:
    """Why the S3 reads cannot run here (moto's server needs moto and flask), or None."""
    import importlib.util

    missing = [m for m in ("moto", "flask") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install 'moto[server]')" if missing else None


def summary(r: dict) -> dict:
    """The headline numbers, printed as the last line (one JSON object)."""
    read = {where: {f"{kind}_{state}": round(r["read"][where][kind][f"{state}_batches_per_s"], 1)
                    for kind in ("build", "pipeline") for state in ("cold", "warm", "streaming")}
            for where in ("local", "s3") if where in r["read"]}
    return dict(benchmark="data", prepare_tokens_per_s={f"{p['tokenizer']}/w{p['workers']}": round(p["tokens_per_s"])
                                                        for p in r["prepare"]["runs"]},
                prepare_identical=all(r["prepare"]["identical"].values()), read_batches_per_s=read,
                step_steps_per_s=round(r["step"]["steps_per_s"], 3),
                ratio={w: {k: round(v, 1) for k, v in x.items()} for w, x in r["ratios"].items()})


def print_table(r: dict) -> None:
    """A short human table of the prepare, read and step numbers."""
    c = r["prepare"]["corpus"]
    print(f"\nprepare: {c['bytes'] / 1e6:.1f} MB JSONL, {c['docs']} docs, {c['parts']} parts; "
          f"identical output across workers: {r['prepare']['identical']}")
    print(f"{'tokenizer':<16}{'workers':>8}{'wall s':>9}{'Mtok/s':>9}{'Mtok/s/worker':>15}")
    for p in r["prepare"]["runs"]:
        print(f"{pathlib.Path(p['tokenizer']).name:<16}{p['workers']:>8}{p['wall_s']:>9.1f}"
              f"{p['tokens_per_s'] / 1e6:>9.2f}{p['tokens_per_s_per_worker'] / 1e6:>15.2f}")
    cfg = r["config"]
    print(f"\nread: batch {cfg['batch']} x seq_len {cfg['seq_len']}, 25% replay, batches/s; cold = first pass on an "
          f"empty chunk cache, warm = median of {cfg['repeats']} later passes, stream = cache too small for the data")
    states = ("cold", "warm", "streaming")
    print(f"{'storage':<8}" + "".join(f"{k + ' ' + s[:6]:>14}" for k in ("build", "pipe") for s in states)
          + "   pipe/step ratio c/w/s")
    for where, ratio in r["ratios"].items():
        rates = [r["read"][where][k][f"{s}_batches_per_s"] for k in ("build", "pipeline") for s in states]
        print(f"{where:<8}" + "".join(f"{x:>14.0f}" for x in rates) + "   " + "/".join(f"{ratio[s]:.0f}" for s in states))
    s = r["step"]
    print(f"\nstep: demo {cfg['batch']}x{cfg['seq_len']} {s['step_s']['median'] * 1e3:.0f} ms median "
          f"({s['steps_per_s']:.2f} steps/s); ratio = pipeline batches/s / steps/s (target >= 10x)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from step import command_line, machine_info, stamp, write_result  # benchmarks/step.py (imports JAX)

    machine = machine_info()
    skipped = "--no-s3" if args.no_s3 else s3_unavailable()
    with tempfile.TemporaryDirectory(prefix="clt-bench-data-") as tmp, contextlib.ExitStack() as stack:
        # The server starts first: its AWS_* variables must be set before tensorstore opens any store.
        s3 = None if skipped else stack.enter_context(moto_s3())
        prep = bench_prepare(args, pathlib.Path(tmp))
        read = bench_read(args, pathlib.Path(tmp), s3)
    step = bench_step(args)
    machine["loadavg_end"] = list(os.getloadavg())
    result = dict(benchmark="data", command=command_line(), machine=machine, config=vars(args), prepare=prep,
                  read=read, step=step, ratios=ratios(read, step), s3_skipped=skipped)
    path = write_result(result, args.out, f"data-{stamp()}.json")
    print_table(result)
    print(f"wrote {path}")
    print(json.dumps(summary(result)))


if __name__ == "__main__":
    main()
