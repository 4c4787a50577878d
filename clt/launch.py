"""One job, several processes: joining them with `jax.distributed`, and `clt launch local`.

`initialize()` runs first in `clt train`, before any other JAX call. It joins the job's other processes when
the environment names a coordinator (`CLT_COORDINATOR=host:port`, `CLT_NUM_PROCESSES`, `CLT_PROCESS_ID`: set
by `clt launch local`, or by hand on each host); without one the process trains alone. On CPU the processes
exchange collectives through gloo.

`clt launch local CONFIG --processes N --workdir DIR` starts N such processes on this machine, joined on
127.0.0.1, with this machine's (simulated) CPU devices split between them: the multi-host code paths (host
slices of each batch, barriers, collective checkpoint saves) run for real without a cluster. Process 0 writes
to this terminal; process i's output goes to DIR/launch/process-i.log.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = "CLT_COORDINATOR", "CLT_NUM_PROCESSES", "CLT_PROCESS_ID"
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


class LaunchError(ValueError):
    """Launch input that cannot work; the one-line message names the option or variable and the fix."""


def job_from_env(env: Mapping[str, str] = os.environ) -> tuple[str, int, int] | None:
    """(coordinator, number of processes, this process's index) when the environment names a job, else None."""
    coordinator = env.get(ENV_COORDINATOR)
    if not coordinator:
        return None
    try:
        n, i = int(env.get(ENV_PROCESSES, "")), int(env.get(ENV_PROCESS_ID, ""))
    except ValueError:
        raise LaunchError(f"{ENV_COORDINATOR} is set, so {ENV_PROCESSES} and {ENV_PROCESS_ID} must be integers (got "
                          f"{env.get(ENV_PROCESSES)!r}, {env.get(ENV_PROCESS_ID)!r}): set both, or unset "
                          f"{ENV_COORDINATOR} to train in one process") from None
    if n < 1 or not 0 <= i < n or ":" not in coordinator:
        raise LaunchError(f"{ENV_COORDINATOR}={coordinator!r} {ENV_PROCESSES}={n} {ENV_PROCESS_ID}={i}: the "
                          "coordinator is host:port and the index is in [0, N)")
    return coordinator, n, i


def initialize(env: Mapping[str, str] = os.environ) -> None:
    """Join the job the environment names (before any other JAX call); a single process does nothing."""
    job = job_from_env(env)
    if job is None or job[1] == 1:
        return
    import jax

    coordinator, n, i = job
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)


def process_label() -> str:
    """'process I/N' when this process is one of several, else '' (prefixes errors, so the failing one is named)."""
    try:
        job = job_from_env()
    except LaunchError:  # reported by initialize(); the label of its own error message must not fail too
        return ""
    return f"process {job[2]}/{job[1]}" if job and job[1] > 1 else ""


def simulated_devices(env: Mapping[str, str] = os.environ) -> int:
    """The CPU device count XLA_FLAGS asks for (1 when it asks for none)."""
    m = _DEVICE_FLAG.search(env.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_commands(config: str, workdir: str, overrides: Sequence[str], processes: int, quiet: bool,
                   env: Mapping[str, str] = os.environ) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, environment) of each process of a local job: `clt train` joined on 127.0.0.1 with the CPU
    devices of XLA_FLAGS (or 1 per process) split evenly."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise LaunchError(f"--processes = {processes!r}: give a positive number of processes")
    total = simulated_devices(env)
    if _DEVICE_FLAG.search(env.get("XLA_FLAGS", "")) and total % processes:
        raise LaunchError(f"--processes = {processes}: the {total} CPU devices of XLA_FLAGS do not split evenly "
                          f"over {processes} processes; use a divisor of {total}")
    per_process = total // processes if _DEVICE_FLAG.search(env.get("XLA_FLAGS", "")) else 1
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    coordinator = f"127.0.0.1:{_free_port()}"
    commands = []
    for i in range(processes):
        argv = [sys.executable, "-m", "clt.cli", "train", config, "--workdir", workdir, *overrides]
        if quiet or i > 0:
            argv.append("--quiet")
        child = dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count="
                     f"{per_process}".strip(), **{ENV_COORDINATOR: coordinator, ENV_PROCESSES: str(processes),
                                                  ENV_PROCESS_ID: str(i)})
        commands.append((argv, child))
    return commands


def launch_local(config: str, workdir: str, overrides: Sequence[str], processes: int, quiet: bool = False) -> int:
    """Run a local job to its end; returns the first failing process's exit code (0 when all succeed).

    SIGINT and SIGTERM are passed on to every process (each then stops the way `clt train` does), and one
    process failing stops the others, so a job never hangs on a peer that is gone.
    """
    commands = local_commands(config, workdir, overrides, processes, quiet)
    logs = pathlib.Path(workdir) / "launch"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "launch.json").write_text(json.dumps(dict(
        kind="local", processes=processes, command=[sys.argv[0], *sys.argv[1:]],
        children=[{"argv": argv, "env": {k: env[k] for k in (ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID,
                                                               "XLA_FLAGS")}} for argv, env in commands]),
        indent=1) + "\n")
    procs = []
    for i, (argv, env) in enumerate(commands):
        out = None if i == 0 else open(logs / f"process-{i}.log", "w")
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait_all(procs, logs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_all(procs: list[subprocess.Popen], logs: pathlib.Path) -> int:
    """Wait for every process; when one fails, give the others a minute to stop, then end them."""
    first_failure: tuple[int, int] | None = None
    deadline = None
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 0) and first_failure is None:
                first_failure, deadline = (i, p.returncode), time.monotonic() + 60
                for other in procs:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if first_failure is None:
        first_failure = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if first_failure is None:
        return 0
    i, code = first_failure
    if i > 0:
        print(f"clt: process {i} exited with {code}; its output is in {logs / f'process-{i}.log'}", file=sys.stderr)
    return code if code > 0 else 1
