"""`clt launch slurm` and `clt launch gke`: the rendered job files are valid bash / YAML with the fields a
cluster needs, the sbatch script runs `clt train` with the exact words given and requeues on SIGTERM (stand-in
srun, scontrol and clt on PATH), `--dry-run` prints and records the job, and bad input is one line, exit 2,
with nothing written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMOKE

from clt import launch

try:
    import yaml
except ImportError:  # the YAML assertions need PyYAML; the rest of the file does not
    yaml = None
needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed: the JobSet is not parsed")

# Quotes, braces, spaces and a dollar sign: each must reach `clt train` as one unchanged word.
TRICKY = ["data.domains={'prose': 'gs://b/prose dir', 'code': \"it's $HOME\"}", "optim.weight_decay=0.05"]
BASH = shutil.which("bash")


def _clt(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "clt.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=dict(env or os.environ, PYTHONPATH=str(ROOT)))


def _stub(folder, name, body):
    path = folder / name
    path.write_text(body)
    path.chmod(0o755)


def _sbatch_lines(text):
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


# ----------------------------------------------------------------------------------------------------------
# The sbatch script.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes,extra", [(1, {}), (4, {"partition": "gpu", "time": "24:00:00", "account": "proj-7"}),
                                         (4, {"time": "2-00:00:00"})])
def test_sbatch_script_shapes(tmp_path, nodes, extra):
    text = launch.render_slurm("/shared/cfg.py", "/shared/runs/a", TRICKY, nodes=nodes, gpus_per_node=8, **extra)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run([BASH, "-n", str(script)], capture_output=True).returncode == 0
    lines = _sbatch_lines(text)
    for expected in ["--job-name=clt-a", f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=8",
                     "--requeue", "--signal=B:TERM@120", "--output=/shared/runs/a/launch/slurm-%j.out",
                     "--open-mode=append", *(f"--{k}={v}" for k, v in extra.items())]:
        assert f"#SBATCH {expected}" in lines
    assert len(lines) == 8 + len(extra)  # no empty --partition/--time/--account lines
    assert "set -euo pipefail" in text
    assert "srun --kill-on-bad-exit=1 bash -c" in text
    assert "trap on_term TERM" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


def _run_sbatch(tmp_path, job_state):
    """Run the script with stand-in srun, scontrol and clt; SIGTERM it once `clt train` runs. Returns what the
    stand-in clt recorded and the scontrol requeue calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                           'SLURM_NTASKS=2 SLURM_PROCID=0 exec "$@"\n')
    _stub(bin_dir, "scontrol", f'#!/bin/bash\ncase "$1 $2" in\n'
                               f'  "show hostnames") printf "node-a\\nnode-b\\n" ;;\n'
                               f'  "show job") echo "JobId=$3 JobState={job_state} Reason=None" ;;\n'
                               f'  requeue*) echo "requeue $2" >> {log} ;;\nesac\n')
    # scancel --signal=TERM JOB.0 reaches the step's tasks (here: the stand-in clt), as SLURM does.
    _stub(bin_dir, "scancel", f'#!/bin/bash\necho "scancel $*" >> {log}\npkill -TERM -f "{bin_dir}/clt"\n')
    record = tmp_path / "clt.json"
    _stub(bin_dir, "clt", f"#!{sys.executable}\nimport json, os, signal, sys, time\n"
                          "def stop(*_):\n"
                          f"    open({str(tmp_path / 'term')!r}, 'w').close(); sys.exit(0)\n"
                          "signal.signal(signal.SIGTERM, stop)\n"
                          f"json.dump(dict(argv=sys.argv[1:], env={{k: os.environ.get(k) for k in "
                          f"('CLT_COORDINATOR', 'CLT_NUM_PROCESSES', 'CLT_PROCESS_ID')}}),\n"
                          f"          open({str(record)!r}, 'w'))\n"
                          "time.sleep(60)\n")
    wd = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    script.write_text(launch.render_slurm(str(SMOKE), str(wd), TRICKY, nodes=2, gpus_per_node=8))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="node-[a-b]")
    proc = subprocess.Popen([BASH, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the stand-in has its handler installed before it writes the record; give bash its trap too
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return json.loads(record.read_text()), (log.read_text() if log.exists() else ""), (tmp_path / "term").exists()


def test_sbatch_runs_clt_train_with_the_exact_words_and_requeues_on_term(tmp_path):
    seen, requeues, terminated = _run_sbatch(tmp_path, "RUNNING")
    assert seen["argv"] == ["train", str(SMOKE), "--workdir", str(tmp_path / "run"), *TRICKY, "--quiet"]
    assert seen["env"] == {"CLT_COORDINATOR": f"node-a:{launch.COORDINATOR_PORT}", "CLT_NUM_PROCESSES": "2",
                           "CLT_PROCESS_ID": "0"}
    assert terminated  # clt train got the SIGTERM (it saves a checkpoint and stops)...
    assert requeues == "scancel --signal=TERM 77.0\nrequeue 77\n"  # ...through the step; then the job is requeued


def test_a_cancelled_job_is_not_requeued(tmp_path):
    _, requeues, terminated = _run_sbatch(tmp_path, "CANCELLED")
    assert terminated and requeues == "scancel --signal=TERM 77.0\n"


# ----------------------------------------------------------------------------------------------------------
# The JobSet.
# ----------------------------------------------------------------------------------------------------------
def _jobset(accelerator, nodes, overrides=TRICKY):
    text = launch.render_gke(str(SMOKE), "gs://bkt/runs/a", overrides, accelerator=accelerator, nodes=nodes,
                             image="us-docker.pkg.dev/p/clt:1")
    configmap, jobset = yaml.safe_load_all(text)
    return text, configmap, jobset


@needs_yaml
@pytest.mark.parametrize("accelerator,nodes,selector,resource,per_node", [
    ("tpu-v5p-64", 8, {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                       "cloud.google.com/gke-tpu-topology": "2x4x4"}, "google.com/tpu", 4),
    ("tpu-v6e-256", 64, {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
                         "cloud.google.com/gke-tpu-topology": "16x16"}, "google.com/tpu", 4),
    ("h100-8", 3, {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, "nvidia.com/gpu", 8)])
def test_jobset_fields(accelerator, nodes, selector, resource, per_node):
    _, configmap, js = _jobset(accelerator, nodes)
    assert configmap["kind"] == "ConfigMap" and configmap["data"]["smoke.py"] == SMOKE.read_text()
    assert (js["apiVersion"], js["kind"], js["metadata"]["name"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet", "clt-a")
    assert js["spec"]["network"]["enableDNSHostnames"] is True and js["spec"]["failurePolicy"]["maxRestarts"] >= 1
    [rj] = js["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    assert (rj["name"], rj["replicas"], job["parallelism"], job["completions"]) == ("workers", 1, nodes, nodes)
    assert (job["completionMode"], job["backoffLimit"]) == ("Indexed", 0)
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == selector
    [c] = pod["containers"]
    assert c["resources"]["limits"] == {resource: per_node} == c["resources"]["requests"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["CLT_COORDINATOR"] == f"clt-a-workers-0-0.clt-a:{launch.COORDINATOR_PORT}"
    assert env["CLT_NUM_PROCESSES"] == str(nodes)
    assert env["CLT_PROCESS_ID"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert c["image"] == "us-docker.pkg.dev/p/clt:1" and c["command"][:2] == ["bash", "-c"]
    [fuse] = [v for v in pod["volumes"] if "csi" in v]
    assert fuse["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert fuse["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    assert job["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    exclusive = js["metadata"].get("annotations", {}).get("alpha.jobset.sigs.k8s.io/exclusive-topology")
    assert exclusive == ("cloud.google.com/gke-nodepool" if resource == "google.com/tpu" else None)


@needs_yaml
@pytest.mark.parametrize("stop", [False, True])
def test_jobset_container_runs_clt_train_and_fails_when_stopped(tmp_path, stop):
    """The pod's command passes the words on unchanged; a SIGTERM (eviction, preemption) ends it with 143, so the
    Job fails and the JobSet restarts it instead of counting a preempted run as done."""
    _, _, js = _jobset("h100-8", 2)
    script = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    bin_dir, record = tmp_path / "bin", tmp_path / "argv.json"
    bin_dir.mkdir()
    _stub(bin_dir, "clt", f"#!{sys.executable}\nimport json, signal, sys, time\n"
                          "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                          f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                          f"time.sleep({60 if stop else 0})\n")
    proc = subprocess.Popen([BASH, "-c", script], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    deadline = time.monotonic() + 30
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if stop:
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == (143 if stop else 0)
    assert json.loads(record.read_text()) == ["train", "/etc/clt/smoke.py", "--workdir", "/gcs/bkt/runs/a", *TRICKY,
                                              "--quiet"]


# ----------------------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------------------
def test_slurm_dry_run_prints_and_records_the_job(tmp_path):
    wd = tmp_path / "run"
    result = _clt("launch", "slurm", str(SMOKE), *TRICKY, "--workdir", str(wd), "--nodes", "2", "--gpus-per-node", "4",
                  "--partition", "gpu", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (wd / "launch" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --partition=gpu" in result.stdout
    plan = json.loads((wd / "launch" / "plan.json").read_text())
    assert plan["devices"] == 8 and len(plan["plan"]["phases"]) == 3
    record = json.loads((wd / "launch" / "launch.json").read_text())
    assert (record["kind"], record["nodes"], record["devices"], record["dry_run"]) == ("slurm", 2, 8, True)


def test_gke_dry_run_writes_into_the_bucket_workdir(gcs_store):
    from clt.data import store

    wd = gcs_store.url("jobs", "run")
    result = _clt("launch", "gke", str(SMOKE), *TRICKY, "batch_size=32", "data.eval_batch=32", "--workdir", wd,
                  "--accelerator", "tpu-v5p-64", "--image", "clt:1", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "kind: JobSet" in result.stdout and "parallelism: 8" in result.stdout
    assert store.read_bytes(store.join(wd, "launch"), "jobset.yaml").decode() == result.stdout
    assert json.loads(store.read_bytes(store.join(wd, "launch"), "launch.json"))["devices"] == 32
    assert store.read_bytes(store.join(wd, "launch"), "plan.json") is not None


def test_submit_runs_sbatch_and_kubectl(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", f'#!/bin/bash\necho "$@" > {tmp_path}/sbatch.args\necho "4242;cluster"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin")
    wd = tmp_path / "run"
    result = _clt("launch", "slurm", str(SMOKE), "--workdir", str(wd), "--nodes", "1", "--gpus-per-node", "8", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("submitted SLURM job 4242;")
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(wd / "launch" / "job.sbatch")]
    assert json.loads((wd / "launch" / "launch.json").read_text())["submitted"] == "4242;cluster"


def _one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clt: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["slurm", "--nodes", "2", "--gpus-per-node", "8", "mesh.data=8", "--dry-run"],
     ["--nodes 2 x", "16 devices", "mesh.data"]),
    (["slurm", "--nodes", "1", "--gpus-per-node", "3", "--dry-run"], ["3 devices", "batch_size"]),
    (["gke", "--accelerator", "tpu-v4-8", "--image", "x", "--dry-run"],
     ["tpu-v4-8", "tpu-v5p-64, tpu-v6e-256, h100-8"]),
    (["gke", "--accelerator", "tpu-v5p-64", "--nodes", "4", "--image", "x", "--dry-run"], ["8 hosts", "--nodes 8"]),
    (["gke", "--accelerator", "h100-8", "--nodes", "2", "--dry-run"], ["--image"]),
    (["gke", "--accelerator", "h100-8", "--image", "x", "--dry-run"], ["needs --nodes"]),
    (["slurm", "--processes", "2", "--nodes", "1", "--gpus-per-node", "8"], ["--processes", "local"]),
    (["slurm", "--nodes", "0", "--gpus-per-node", "8", "--dry-run"], ["--nodes = 0"]),
    (["local", "--processes", "2", "--dry-run"], ["--dry-run", "slurm / gke"]),
    (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--dry-run", "--partition", "a b"], ["--partition", "spaces"]),
])
def test_bad_launch_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    wd = tmp_path / "run"
    where, *rest = args
    if where == "gke":
        wd = "gs://bkt/run"  # refused before anything is written: no bucket is needed
    _one_line_error(_clt("launch", where, str(SMOKE), "--workdir", str(wd), *rest), *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where,tool,args", [
    ("slurm", "sbatch", ["--nodes", "1", "--gpus-per-node", "8"]),
    ("gke", "kubectl", ["--accelerator", "h100-8", "--nodes", "1", "--image", "clt:1"])])
def test_no_submit_tool_on_path(tmp_path, where, tool, args):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PATH=f"{empty}:{os.path.dirname(sys.executable)}")
    wd = str(tmp_path / "run") if where == "slurm" else "gs://bkt/run"
    _one_line_error(_clt("launch", where, str(SMOKE), "--workdir", wd, *args, env=env), tool, "--dry-run")
    assert not (tmp_path / "run").exists()


def test_workdir_kinds(tmp_path):
    _one_line_error(_clt("launch", "slurm", str(SMOKE), "--workdir", "gs://bkt/run", "--nodes", "1",
                         "--gpus-per-node", "8", "--dry-run"), "shared file system")
    _one_line_error(_clt("launch", "gke", str(SMOKE), "--workdir", str(tmp_path / "run"), "--accelerator", "h100-8",
                         "--nodes", "1", "--image", "clt:1", "--dry-run"), "gs://BUCKET/PATH")
    assert not (tmp_path / "run").exists()
