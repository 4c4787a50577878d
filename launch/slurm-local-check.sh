#!/usr/bin/env bash
# A real scheduler, once: the smoke plan as a 2-task SLURM job through `clt launch slurm`, requeued mid-run
# with `scontrol requeue`, must finish with the losses of an uninterrupted one-process run.
#
#   launch/slurm-local-check.sh [SCRATCH]      (root; default SCRATCH=/tmp/clt-slurm-check)
#
# Starts the one-node cluster (launch/slurm-local-cluster.sh), prepares small demo data, trains the reference
# with `clt train` (1 process x 8 CPU devices), submits the job (1 node x 2 tasks x 4 CPU devices), requeues it
# once three metric rows are written, waits for it to finish and compares metrics.jsonl (counts equal, floats
# within 1e-5 relative) and the resume/preemption events. Exit 0 when everything holds.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SCRATCH="${1:-/tmp/clt-slurm-check}"
PY="$ROOT/.venv/bin/python"
export PATH="$ROOT/.venv/bin:$PATH" JAX_PLATFORMS=cpu PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$ROOT/launch/slurm-local-cluster.sh" start
rm -rf "$SCRATCH" && mkdir -p "$SCRATCH"
"$PY" -c "from clt.data.prepare import prepare_demo; prepare_demo('$SCRATCH/data', progress=False, max_bytes=150_000)"
DOMAINS="data.domains={'prose': '$SCRATCH/data/prose', 'code': '$SCRATCH/data/code'}"

echo "== reference: one process, 8 CPU devices"
XLA_FLAGS=--xla_force_host_platform_device_count=8 clt train "$ROOT/configs/smoke.py" --workdir "$SCRATCH/reference" \
  "$DOMAINS" --quiet

echo "== the job: 1 node x 2 tasks x 4 CPU devices, through clt launch slurm"
out="$(XLA_FLAGS=--xla_force_host_platform_device_count=4 clt launch slurm "$ROOT/configs/smoke.py" \
  --workdir "$SCRATCH/job" --nodes 1 --tasks-per-node 2 --gpus-per-node 0 "$DOMAINS")"
echo "$out"
job="$(echo "$out" | sed -n 's/^submitted SLURM job \([0-9]*\).*/\1/p')"
rows() { [ -f "$SCRATCH/job/metrics.jsonl" ] && wc -l < "$SCRATCH/job/metrics.jsonl" || echo 0; }
for _ in $(seq 1 1200); do [ "$(rows)" -ge 3 ] && break; sleep 0.1; done
echo "== requeue job $job at $(date +%T) after $(rows) metric rows"
scontrol requeue "$job"
for _ in $(seq 1 600); do squeue -h -j "$job" 2>/dev/null | grep -q . || break; sleep 1; done
grep -v Gloo "$SCRATCH/job/launch/slurm-$job.out" | grep -E "requeue|SIGTERM|preempt|sync point|resum|finished" || true

"$PY" - "$SCRATCH" <<'EOF'
import json, sys
scratch = sys.argv[1]
rows = lambda wd: [json.loads(line) for line in open(f"{scratch}/{wd}/metrics.jsonl")]
ref, job = rows("reference"), rows("job")
assert [r["step"] for r in job] == [r["step"] for r in ref], "different logged steps"
worst = 0.0
for a, b in zip(ref, job):
    assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
    for k in a.keys() - {"tokens_per_s", "mfu"}:
        if isinstance(a[k], float):
            worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
        else:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
events = [json.loads(line) for line in open(f"{scratch}/job/events.jsonl")]
story = [(e["event"], e["step"]) for e in events if e["event"] in ("preempted", "resume", "finished")]
assert worst <= 1e-5 and [e for e, _ in story] == ["preempted", "resume", "finished"], (worst, story)
print(f"OK: {len(job)} metric rows as the reference (largest relative difference {worst:.1e}); {story}")
EOF
