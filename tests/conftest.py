"""Test setup: 8 simulated CPU devices (so sharding and resharding paths run on any machine), a persistent
compilation cache, and the small demo data that trainer tests share."""

import os
import pathlib

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
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
