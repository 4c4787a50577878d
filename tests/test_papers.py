"""The paper reproductions (configs/papers/, benchmarks/reproductions.py, REPRODUCTIONS.md): every sweep config
loads and every point validates at its default size, and a smoke-sized version of every sweep (its first point,
budget.steps=12: seconds per run) runs through the generator, which writes each sweep's report and the document.
This checks that the tables are produced, not the science (REPRODUCTIONS.md holds that)."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import JAX_CACHE, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import reproductions  # noqa: E402

SWEEPS = [name for s in reproductions.SECTIONS for name in s.sweeps]


def test_every_sweep_of_every_section_is_a_committed_config():
    on_disk = sorted(p.stem for p in (ROOT / "configs" / "papers").glob("*.py"))
    plans = {"continual", "pretrain", "three_domains"}
    assert sorted(SWEEPS) == sorted(set(on_disk) - plans)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_point_of_every_sweep_validates_at_the_default_size_and_ten_times_it(name, monkeypatch):
    from clt import sweep

    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository (data need not exist)
    spec = sweep.load_sweep(f"configs/papers/{name}.py")
    built = sweep.validate(spec, sweep.expand(spec))
    big = sweep.load_sweep(f"configs/papers/{name}.py", ["size=10"])  # the size knob for larger machines
    scaled = sweep.validate(big, sweep.expand(big))
    assert built and list(scaled) == list(built)
    def steps(c):
        return c.budget.steps, c.monitor.every, c.monitor.dense_every, c.monitor.dense_window, c.log.every

    for (cfg, plan), (cfg10, plan10) in zip(built.values(), scaled.values()):
        assert steps(cfg10) == tuple(10 * v for v in steps(cfg))
        assert [p.end for p in plan10.phases] == [10 * p.end for p in plan.phases]  # the same plan, 10x longer


@pytest.fixture(scope="module")
def smoke_reproductions(demo_data, tmp_path_factory):
    """benchmarks/reproductions.py --steps 12 --first in a folder where configs/ and data/demo are the repository's
    configs and the session's small demo data (the configs' relative paths)."""
    here = tmp_path_factory.mktemp("papers")
    (here / "configs").symlink_to(ROOT / "configs")
    (here / "data").mkdir()
    (here / "data" / "demo").symlink_to(demo_data)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproductions.py"), "--steps", "12", "--first",
                           "--workdir", "runs", "--docs", "docs", "--out", "REPRODUCTIONS.md"], cwd=here, env=env,
                          capture_output=True, text=True, timeout=600)
    return here, done


def test_a_smoke_sized_version_of_every_sweep_produces_its_table_and_the_document(smoke_reproductions):
    here, done = smoke_reproductions
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = (here / "REPRODUCTIONS.md").read_text()
    for section in reproductions.SECTIONS:
        assert f"## {section.title}" in doc
    for name in SWEEPS:
        rows = list(csv.DictReader((here / "docs" / name / "results.csv").open()))
        assert sum(r["finished"] == "1" for r in rows) == 1, name  # the first point ran, the others are listed
        assert any(r[k] for r in rows for k in r if k.startswith("final/")), name
        table = (here / "docs" / name / "results.md").read_text()
        assert table.count("\n|") == len(rows) + 2, name  # the header, its rule, a row per point
        assert f"### `{name}`" in doc
        assert list((here / "docs" / name).glob("eval_*.png")), name  # the plots were drawn


def _witten_bell_nats_per_byte(fit: list[str], doc: str, order: int) -> float:
    """An independent, loop-by-loop byte n-gram model with Witten-Bell interpolation (the reference that
    reproductions.byte_ngram_scores' vectorised counting must equal)."""
    import math
    from collections import Counter

    grams, ctx, succ = Counter(), Counter(), Counter()
    for text in fit:
        b = text.encode()
        for n in range(order):
            for i in range(n, len(b)):
                if not grams[b[i - n:i + 1]]:
                    succ[b[i - n:i]] += 1
                grams[b[i - n:i + 1]] += 1
                ctx[b[i - n:i]] += 1
    b, total = doc.encode(), 0.0
    for i in range(len(b)):
        p = 1 / 256
        for n in range(min(i, order - 1) + 1):
            h = b[i - n:i]
            if ctx[h]:
                p = (grams[b[i - n:i + 1]] + succ[h] * p) / (ctx[h] + succ[h])
        total -= math.log(p)
    return total / len(b)


def test_the_relevance_score_is_the_cross_entropy_difference_of_two_witten_bell_byte_ngram_models():
    new = ["LATIN SMALL LETTER A\nLATIN SMALL LETTER B\n", "GREEK SMALL LETTER ALPHA\n", "DIGIT ZERO\nDIGIT ONE\n",
           "LATIN CAPITAL LETTER A WITH GRAVE\n", "\u00e9t\u00e9 \u00e0 \u00c0\n"]
    old = ["The letter a is small.\n", "Digits: zero and one.\n"]
    got = reproductions.relevance_scores(new, old, order=4)
    folds = {0: new[1::2], 1: new[0::2]}  # document i is scored by a model of the other parity's documents
    want = [_witten_bell_nats_per_byte(folds[i % 2], d, 4) - _witten_bell_nats_per_byte(old, d, 4)
            for i, d in enumerate(new)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_the_guo_subsets_are_equal_in_bytes_the_quality_one_is_the_most_relevant_and_all_train(demo_data, tmp_path,
                                                                                                monkeypatch):
    from clt.data.shards import Shard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_data)
    reproductions.prepare_guo_subsets()  # data/demo -> data/demo_guo, as benchmarks/reproductions.py runs it
    old = reproductions.prepared_documents(str(demo_data / reproductions.GUO_OLD / "train"))
    for domain in reproductions.GUO_NEW:
        pool = reproductions.prepared_documents(str(demo_data / domain / "train"))
        held_out = reproductions.prepared_documents(str(demo_data / domain / "eval"))
        assert sum(len(d.encode()) for d in pool) == Shard(demo_data / domain / "train").num_bytes  # exact text
        relevance = reproductions.relevance_scores(pool, old)
        subsets = reproductions.guo_subsets(pool, relevance)
        size = {k: sum(len(d.encode()) for d in v) for k, v in subsets.items()}
        assert subsets["sub"] == pool[::reproductions.GUO_EVERY]
        longest = max(len(d.encode()) for d in subsets["top"])
        assert size["sub"] <= size["top"] < size["sub"] + longest  # the first document to reach the size is last
        scores = dict(zip(pool, relevance))
        assert max(scores[d] for d in subsets["top"]) <= min(v for d, v in scores.items() if d not in subsets["top"])
        assert [pool.index(d) for d in subsets["top"]] == sorted(pool.index(d) for d in subsets["top"])
        for name, docs in subsets.items():  # every document of a subset trains; its eval is held-out text
            prepared = pathlib.Path("data/demo_guo", domain, name)
            assert reproductions.prepared_documents(str(prepared / "train")) == docs
            (placeholder,) = reproductions.prepared_documents(str(prepared / "eval"))
            assert placeholder.startswith(held_out[0]) and not set(docs) & set(held_out)
