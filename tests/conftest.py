"""Test setup: 8 simulated CPU devices (so sharding and resharding paths run on any machine), a persistent
compilation cache in the system's temporary folder, the small demo data that trainer tests share, and one
uninterrupted smoke run per session.

Tests run from any directory and write only to temporary folders: paths in the repository go through ROOT
(e.g. SMOKE), never the current directory."""

import os
import pathlib
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytest_plugins = ["objstores"]  # the s3_store and gcs_store fixtures (local S3 server, GCS emulator)
SMOKE = ROOT / "configs" / "smoke.py"

# Outside the repository, shared by every checkout of this user (entries are keyed by the program and versions).
# Subprocesses that should share it get JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE).
_uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
JAX_CACHE = pathlib.Path(tempfile.gettempdir()) / f"clt-jax-cache-{_uid}"
jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> pathlib.Path:
    """Small demo domains (prose, code, unicode) prepared once per test session."""
    from clt.data.prepare import prepare_demo

    out = tmp_path_factory.mktemp("data") / "demo"
    prepare_demo(str(out), progress=False, max_bytes=150_000)
    return out


def smoke_overrides(data: pathlib.Path, *extra: str) -> list[str]:
    """Overrides that point configs/smoke.py at the session's data."""
    domains = {"prose": str(data / "prose"), "code": str(data / "code")}
    return [f"data.domains={domains!r}", *extra]


def smoke_config(data: pathlib.Path, *extra: str):
    """configs/smoke.py on the session's data, with `extra` overrides."""
    from clt import config

    return config.load(str(SMOKE), smoke_overrides(data, *extra))


def _listing(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="session")
def smoke_run(demo_data, tmp_path_factory):
    """(cfg, workdir, result) of one uninterrupted configs/smoke.py run, trained once per session and read by
    several test files. Read-only: a test that trains on from it copies the workdir first (shutil.copytree);
    the teardown fails the session if any test changed a file in it."""
    from clt import train

    cfg = smoke_config(demo_data)
    wd = tmp_path_factory.mktemp("smoke")
    result = train.train(cfg, str(wd), progress=False)
    before = _listing(wd)
    yield cfg, wd, result
    after = _listing(wd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test modified the shared smoke run's workdir (copy it instead): {changed[:5]}"
