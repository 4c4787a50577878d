"""The paper reproductions (configs/papers/, benchmarks/reproductions.py, REPRODUCTIONS.md): every sweep config
loads and every point validates at its default size, and a smoke-sized version of every sweep (its first point,
budget.steps=12: seconds per run) runs through the generator, which writes each sweep's report and the document.
This checks that the tables are produced, not the science (REPRODUCTIONS.md holds that)."""

import csv
import os
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
def test_every_point_of_every_sweep_validates_at_the_default_size(name, monkeypatch):
    from clt import sweep

    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository (data need not exist)
    spec = sweep.load_sweep(f"configs/papers/{name}.py")
    built = sweep.validate(spec, sweep.expand(spec))
    assert built


@pytest.fixture(scope="module")
def smoke_reproductions(demo_data, tmp_path_factory):
    """benchmarks/reproductions.py --size 12 --first in a folder where configs/ and data/demo are the repository's
    configs and the session's small demo data (the configs' relative paths)."""
    here = tmp_path_factory.mktemp("papers")
    (here / "configs").symlink_to(ROOT / "configs")
    (here / "data").mkdir()
    (here / "data" / "demo").symlink_to(demo_data)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproductions.py"), "--size", "12", "--first",
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
