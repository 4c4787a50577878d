"""One job, several processes: joining them with `jax.distributed`; `clt launch local`, `slurm` and `gke`.

`initialize()` runs first in `clt train`, before any other JAX call. It joins the job's other processes when
the environment names a coordinator (`CLT_COORDINATOR=host:port`, `CLT_NUM_PROCESSES`, `CLT_PROCESS_ID`: set
by `clt launch local`, by the SLURM and GKE job files, or by hand on each host); without one the process trains
alone. On CPU the processes exchange collectives through gloo.

`clt launch local CONFIG --processes N --workdir DIR` starts N such processes on this machine, joined on
127.0.0.1, with this machine's (simulated) CPU devices split between them: the multi-host code paths (host
slices of each batch, barriers, collective checkpoint saves) run for real without a cluster. Process 0 writes
to this terminal; process i's output goes to DIR/launch/process-i.log.

`clt launch slurm|gke` render a job file from the templates in launch/ (one `clt train` per node, process 0 the
coordinator), check the config against the job's device count as `clt plan show --devices N` does, record the
job in WORKDIR/launch/ and submit it with sbatch / kubectl (or print it with --dry-run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from clt.config import Config
    from clt.plan import Plan

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


def job_env(coordinator: str | None, num_processes: int | None, process_id: int | None,
            env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` with the job given by `clt train --coordinator --num-processes --process-id` (all three or none),
    so flags and environment go through the same checks."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return dict(env)
    if not all(given):
        raise LaunchError("--coordinator, --num-processes and --process-id go together: give all three (or none, "
                          f"to use {ENV_COORDINATOR} and its companions)")
    job = {ENV_COORDINATOR: str(coordinator), ENV_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(process_id)}
    job_from_env(job)  # the same checks as for the variables
    return dict(env, **job)


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


def is_secondary() -> bool:
    """Whether this process is one of a job's processes other than process 0 (which alone logs and reports)."""
    try:
        job = job_from_env()
    except LaunchError:
        return False
    return job is not None and job[1] > 1 and job[2] > 0


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


# ----------------------------------------------------------------------------------------------------------
# `clt launch slurm` and `clt launch gke`: render a job file from launch/, check the config against the job's
# device count, record it in WORKDIR/launch/, then submit it (or print it with --dry-run).
# ----------------------------------------------------------------------------------------------------------
COORDINATOR_PORT = 8476
GCS_MOUNT = "/gcs"  # a gs://BUCKET/PATH workdir is /gcs/BUCKET/PATH inside a GKE pod
_SAFE = re.compile(r"[\w@%+=:,./-]+")  # what shlex.quote leaves as is; #SBATCH lines are not shell-parsed
_DNS_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A GKE node type: the node selector that picks it, the resource a pod requests on it, and for a TPU
    slice its fixed number of hosts (one pod per host; None: any number of nodes)."""

    selector: tuple[tuple[str, str], ...]
    resource: str
    per_node: int  # TPU chips or GPUs per node = JAX devices per process
    hosts: int | None = None


# Sources: cloud.google.com/tpu/docs/v5p (2x4x4: 64 TensorCores, 32 chips, 8 hosts; v5p names count
# TensorCores, 2 per chip), cloud.google.com/tpu/docs/v6e (16x16: 256 chips, 64 VMs of ct6e-standard-4t, 4 chips
# each; v6e names count chips), GKE's node labels for TPU slices and GPU nodes.
ACCELERATORS: dict[str, Accelerator] = {
    "tpu-v5p-64": Accelerator((("cloud.google.com/gke-tpu-accelerator", "tpu-v5p-slice"),
                               ("cloud.google.com/gke-tpu-topology", "2x4x4")), "google.com/tpu", 4, hosts=8),
    "tpu-v6e-256": Accelerator((("cloud.google.com/gke-tpu-accelerator", "tpu-v6e-slice"),
                                ("cloud.google.com/gke-tpu-topology", "16x16")), "google.com/tpu", 4, hosts=64),
    "h100-8": Accelerator((("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),), "nvidia.com/gpu", 8),
}


class _Template(string.Template):
    """`{{name}}` placeholders, so that bash's `$VAR` and YAML's braces in the templates stay as written."""

    delimiter = "{{"
    pattern = r"\{\{(?:(?P<named>[a-z_]+)\}\}|(?P<braced>(?!))|(?P<escaped>(?!))|(?P<invalid>(?!)))"


def _template(name: str) -> _Template:
    from clt.config.schema import REPO_ROOT

    return _Template((REPO_ROOT / "launch" / name).read_text())


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else "" for line in text.splitlines())


def _sbatch_value(option: str, value: object) -> str:
    """A value for an #SBATCH line: sbatch reads those lines without a shell, so a value must need no quoting."""
    text = str(value)
    if not _SAFE.fullmatch(text):
        raise LaunchError(f"{option} = {text!r}: SLURM's #SBATCH lines cannot carry spaces or quotes; use "
                          "letters, digits and @%+=:,./-_ only")
    return text


def _train_words(config: str, workdir: str, overrides: Sequence[str]) -> str:
    """`clt train CONFIG --workdir WORKDIR OVERRIDES --quiet`, each word shell-quoted."""
    for o in overrides:
        if "\n" in o or "\r" in o:
            raise LaunchError(f"override {o!r} spans lines; write it on one line")
    return shlex.join(["clt", "train", config, "--workdir", workdir, *overrides, "--quiet"])


def render_slurm(config: str, workdir: str, overrides: Sequence[str], *, nodes: int, gpus_per_node: int,
                 partition: str | None = None, time: str | None = None, account: str | None = None,
                 name: str | None = None, tasks_per_node: int = 1) -> str:
    """The sbatch script of a job of `nodes` x `tasks_per_node` processes with `gpus_per_node` GPUs per node
    (0: CPU nodes, whose JAX devices are the CPU devices of the submitting shell's XLA_FLAGS, which sbatch
    passes on)."""
    optional = "".join(f"#SBATCH --{opt}={_sbatch_value('--' + opt, v)}\n"
                       for opt, v in (("gpus-per-node", gpus_per_node), ("partition", partition), ("time", time),
                                      ("account", account)) if v)
    return _template("slurm.sbatch").substitute(
        job_name=_sbatch_value("--name", name or default_name(workdir)), nodes=int(nodes),
        tasks_per_node=int(tasks_per_node), optional_lines=optional, workdir=_sbatch_value("--workdir", workdir),
        port=COORDINATOR_PORT, train_command=_train_words(config, workdir, overrides))


def default_name(workdir: str) -> str:
    """`clt-<workdir's last folder>`, lower-cased to a DNS label (JobSet and pod names are DNS names)."""
    base = re.sub(r"[^a-z0-9-]+", "-", workdir.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    return f"clt-{base}"[:40].rstrip("-")


def _bucket_path(workdir: str) -> tuple[str, str]:
    """(bucket, path inside the pods) of a gs://BUCKET/PATH workdir."""
    if not workdir.startswith("gs://"):
        raise LaunchError(f"--workdir {workdir}: GKE pods share no file system with this machine or each other; "
                          "give a folder of a Cloud Storage bucket, gs://BUCKET/PATH (mounted in every pod)")
    bucket, _, path = workdir[len("gs://"):].partition("/")
    if not bucket or not path.strip("/"):
        raise LaunchError(f"--workdir {workdir}: give a folder inside the bucket, gs://BUCKET/PATH")
    return bucket, f"{GCS_MOUNT}/{bucket}/{path.strip('/')}"


def render_gke(config: str, workdir: str, overrides: Sequence[str], *, accelerator: str, nodes: int, image: str,
               name: str | None = None, max_restarts: int = 10) -> str:
    """The JobSet (and the ConfigMap holding the config file) of a job of `nodes` pods on `accelerator`
    nodes; `workdir` is gs://BUCKET/PATH, mounted in each pod, and `config` a local file copied into the
    ConfigMap."""
    acc = accelerator_of(accelerator)
    name = name or default_name(workdir)
    if not _DNS_NAME.fullmatch(name) or len(name) > 40:
        raise LaunchError(f"--name {name!r}: a JobSet name is a DNS label of at most 40 characters: lower-case "
                          "letters, digits and '-', starting with a letter")
    bucket, pod_workdir = _bucket_path(workdir)
    key = pathlib.Path(config).name
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
        raise LaunchError(f"config {config}: a ConfigMap key holds only letters, digits and -._; rename the file")
    script = "\n".join([
        'trap \'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 143\' TERM  # stopped, not done: restart',
        _train_words(f"/etc/clt/{key}", pod_workdir, overrides) + " &",
        "pid=$!",
        'wait "$pid"'])
    tpu = acc.resource == "google.com/tpu"
    return _template("jobset.yaml").substitute(
        name=name, config_key=json.dumps(key), config_text=_indent(pathlib.Path(config).read_text(), 4),
        jobset_annotations=("  annotations:\n    alpha.jobset.sigs.k8s.io/exclusive-topology: "
                            "cloud.google.com/gke-nodepool  # the whole slice, one node pool\n") if tpu else "",
        max_restarts=int(max_restarts), nodes=int(nodes), image=json.dumps(image), resource=acc.resource,
        per_node=acc.per_node, node_selector=_indent("\n".join(f"{k}: {json.dumps(v)}" for k, v in acc.selector), 14),
        container_script=_indent(script, 16), port=COORDINATOR_PORT, bucket=json.dumps(bucket),
        coordinator=json.dumps(f"{name}-workers-0-0.{name}:{COORDINATOR_PORT}"), mount_path=f"{GCS_MOUNT}/{bucket}")


def accelerator_of(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise LaunchError(f"--accelerator {name!r}: unknown; use one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]


def _positive(option: str, value: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LaunchError(f"{option} = {value!r}: give a positive number")
    return value


def job_shape(kind: str, nodes: int | None, gpus_per_node: int | None,
              accelerator: str | None, tasks_per_node: int = 1) -> tuple[int, int, str]:
    """(nodes, JAX devices per node, how the per-node count was given) of a slurm or gke job; a TPU slice
    fixes its node count. SLURM CPU nodes (--gpus-per-node 0) have the CPU devices of XLA_FLAGS per task."""
    if kind == "slurm":
        tasks = _positive("--tasks-per-node", tasks_per_node)
        if gpus_per_node == 0:
            cpus = simulated_devices()
            return _positive("--nodes", nodes), tasks * cpus, f"{tasks} task(s) x {cpus} CPU device(s) per node"
        gpus = _positive("--gpus-per-node", gpus_per_node)
        if gpus % tasks:
            raise LaunchError(f"--tasks-per-node {tasks}: the {gpus} GPUs of a node do not split evenly over "
                              f"{tasks} processes; use a divisor of {gpus}")
        return _positive("--nodes", nodes), gpus, "--gpus-per-node"
    if accelerator is None:
        raise LaunchError(f"clt launch gke needs --accelerator: one of {', '.join(ACCELERATORS)}")
    acc = accelerator_of(accelerator)
    what = f"{accelerator}'s {acc.per_node} {'chips' if acc.hosts else 'GPUs'} per node"
    if acc.hosts is None:
        if nodes is None:
            raise LaunchError(f"--accelerator {accelerator} needs --nodes: the number of {acc.per_node}-GPU nodes")
        return _positive("--nodes", nodes), acc.per_node, what
    if nodes is not None and nodes != acc.hosts:
        raise LaunchError(f"--nodes {nodes}: a {accelerator} slice has {acc.hosts} hosts, one pod each; give "
                          f"--nodes {acc.hosts} or leave --nodes out")
    return acc.hosts, acc.per_node, what


def check_job_config(config: str, overrides: Sequence[str], nodes: int, per_node: int,
                     what: str) -> tuple[Config, Plan]:
    """Load the config and run `clt plan show --devices N`'s checks for the job's nodes x devices per node;
    returns (config, resolved plan)."""
    from clt import config as configs, step
    from clt.config import ConfigError

    cfg = configs.load(config, overrides)
    try:
        return cfg, step.checked_plan(cfg, nodes * per_node)
    except ConfigError as e:
        raise LaunchError(f"--nodes {nodes} x {what} = {nodes * per_node} devices: {e}") from None


def _write(workdir: str, name: str, text: str) -> str:
    """WORKDIR/launch/NAME, on disk or in the workdir's bucket; returns where it went."""
    from clt.data import store

    if store.is_remote(workdir):
        store.write_bytes(store.join(workdir, "launch"), name, text.encode())
        return store.join(workdir, "launch", name)
    folder = pathlib.Path(workdir) / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


def launch_job(kind: str, config: str, workdir: str, overrides: Sequence[str], *, nodes: int | None = None,
               gpus_per_node: int | None = None, partition: str | None = None, time: str | None = None,
               account: str | None = None, accelerator: str | None = None, image: str | None = None,
               name: str | None = None, dry_run: bool = False, tasks_per_node: int = 1, echo: bool = True) -> int:
    """Check, render and record a slurm or gke job in WORKDIR/launch/; then print it (dry run; `echo=False`
    leaves that to the file, as `clt sweep` does for its many jobs) or submit it.

    Everything that can be wrong (the shape, the config against it, the submit tool) is checked before
    anything is written, so a refused launch leaves nothing behind."""
    from clt.data import store

    tool = {"slurm": "sbatch", "gke": "kubectl"}[kind]
    n, per_node, what = job_shape(kind, nodes, gpus_per_node, accelerator, tasks_per_node)
    if kind == "slurm":
        if store.is_remote(workdir):
            raise LaunchError(f"--workdir {workdir}: a SLURM job's workdir is a folder on the cluster's shared "
                              "file system (clt train writes it through the file system)")
        workdir, config = os.path.abspath(workdir), os.path.abspath(config)
    else:
        _bucket_path(workdir)
        if not image:
            raise LaunchError("clt launch gke needs --image: a container image with clt installed (see the README)")
    if not dry_run and shutil.which(tool) is None:
        raise LaunchError(f"{tool} is not on PATH: run this where {tool} works, or pass --dry-run to write and "
                          "print the job file")
    cfg, plan = check_job_config(config, overrides, n, per_node, what)
    if kind == "slurm":
        text = render_slurm(config, workdir, overrides, nodes=n, gpus_per_node=gpus_per_node, partition=partition,
                            time=time, account=account, name=name, tasks_per_node=tasks_per_node)
    else:
        text = render_gke(config, workdir, overrides, accelerator=accelerator, nodes=n, image=image, name=name)
        _warn_local_domains(cfg)
    file = _write(workdir, "job.sbatch" if kind == "slurm" else "jobset.yaml", text)
    _write(workdir, "plan.json", json.dumps(dict(plan=plan.to_json(), digest=plan.digest(), config=cfg.to_dict(),
                                                 devices=n * per_node), indent=1) + "\n")
    record = dict(kind=kind, command=[sys.argv[0], *sys.argv[1:]], nodes=n, devices_per_node=per_node,
                  devices=n * per_node, file=file, accelerator=accelerator, image=image, partition=partition,
                  time=time, account=account, dry_run=dry_run)
    _write(workdir, "launch.json", json.dumps(record, indent=1) + "\n")
    if dry_run:
        if echo:
            print(text, end="")
        print(f"clt: dry run: wrote {file} (and plan.json, launch.json next to it); nothing submitted",
              file=sys.stderr)
        return 0
    record["submitted"] = _submit(kind, file, text)
    _write(workdir, "launch.json", json.dumps(record, indent=1) + "\n")
    return 0


def _warn_local_domains(cfg: Config) -> None:
    """A pod reads its image's files and buckets, not this machine's: say so for each local domain path."""
    for domain, path in cfg.data.domains:
        if not path.startswith(("gs://", "s3://")):
            print(f"clt: warning: data.domains.{domain} = {path!r} is not in a bucket; the pods read it from "
                  "their image", file=sys.stderr)


def _submit(kind: str, file: str, text: str) -> str:
    """Run sbatch FILE / kubectl apply (the text on stdin: the file may be in a bucket); print and return what
    it answered."""
    argv = ["sbatch", "--parsable", file] if kind == "slurm" else ["kubectl", "apply", "-f", "-"]
    done = subprocess.run(argv, input=None if kind == "slurm" else text, capture_output=True, text=True)
    answer = done.stdout.strip()
    if done.returncode:
        last = (done.stderr.strip() or answer or "no output").splitlines()[-1]
        raise LaunchError(f"{' '.join(argv)} failed (exit {done.returncode}): {last}")
    if kind == "slurm":
        job = answer.split(";")[0]
        print(f"submitted SLURM job {job}; its log is {os.path.dirname(file)}/slurm-{job}.out")
    else:
        print(answer)
    return answer
