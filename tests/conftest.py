"""Test setup: 8 simulated CPU devices, so sharding and resharding paths run on any machine."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] if "device_count" in os.environ["XLA_FLAGS"] else (
    os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
