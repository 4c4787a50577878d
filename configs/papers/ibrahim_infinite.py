"""Sweep: Ibrahim et al. 2024 (see configs/papers/ibrahim_replay.py), infinite LR schedules: over a sequence of
tasks, an infinite schedule (warmup and cooldown once, then a constant LR across tasks, with a short anneal
whenever a model is wanted) does about as well as re-warming and re-decaying a cosine on every task, and
avoids the re-warm's loss increase at each switch.

    clt sweep configs/papers/ibrahim_infinite.py --workdir runs/papers/ibrahim_infinite

Two runs of configs/papers/three_domains.py (prose -> code -> unicode, 200 steps each, no replay):
- cos: a re-warmed cosine per task (warmup 2.5%, 3e-3 -> 3e-4);
- inf: infinite cosine: warmup, cooldown over 60% of task 1 to 1.65e-3 (the preset's const/peak ratio), constant
  after it, and in every task a branch anneal over its last 10% to 3e-4: the annealed model is evaluated
  (release/<task>/<domain>) and training continues from the pre-anneal state, as the schedule intends.
Compare each task's end (cos: end/<task>/*) with its release (inf: release/<task>/*). One seed.
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

COS = dict(kind="cosine", warmup=0.025, peak=3e-3, end=3e-4)
INF = dict(preset="infinite_cosine", warmup=0.05, peak=3e-3, const=1.65e-3, end=3e-4, cooldown=0.6, anneal=0.1,
           branch=True)


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/three_domains.py"
    c.axes = (dict(zip=(
        dict(key="phases.t1.schedule", values=(dict(COS, warmup=0.05), INF), label="sched", names=("cos", "inf")),
        dict(key="phases.t2.schedule", values=(COS, dict(INF, warmup=0)), label="s2", names=("cos", "inf")),
        dict(key="phases.t3.schedule", values=(COS, dict(INF, warmup=0)), label="s3", names=("cos", "inf")),
    )),)
    c.metrics = ("end/*", "release/*", "gap/*", "final/*")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
