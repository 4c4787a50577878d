"""Sweep: Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language Models"):
re-warm + re-decay + a little replay of the old data matches re-training from scratch on the union of both
datasets; more replay forgets less and adapts slightly less, and a stronger shift needs more replay (5% for a
weak shift, 25% for a strong one). Their Table 2 (405M, Pile -> German): replay 0/1/5/10/25/50% gives Pile loss
3.56/2.83/2.57/2.46/2.33/2.24 and German 1.11/1.12/1.12/1.13/1.16/1.22.

    clt sweep configs/papers/ibrahim_replay.py --workdir runs/papers/ibrahim_replay
    clt sweep configs/papers/ibrahim_scratch.py --workdir runs/papers/ibrahim_scratch   # the baseline

Ten runs of configs/papers/continual.py: the weak (prose -> code) and strong (prose -> unicode) shift x replay
0, 1, 5, 25, 50% of the shift phase's rows from the old domain (re-warm over 1% to the pre-training peak,
cosine re-decay). Replay takes rows from the phase's budget: the compute is equal across points. The baseline
(configs/papers/ibrahim_scratch.py) trains one phase on a 50/50 union of both domains for the same 400 steps.
Scaled down: a 0.1M-parameter model and 200 + 200 steps instead of 405M/10B models on 300B + 200B tokens; one
seed. Size: size=N on both sweeps (N times the steps and the eval intervals).
"""

import ml_collections

PAIRS = {"weak": {"old": "data/demo/prose", "new": "data/demo/code"},
         "strong": {"old": "data/demo/prose", "new": "data/demo/unicode"}}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.axes = (dict(key="data.domains", values=tuple(PAIRS.values()), label="shift", names=tuple(PAIRS)),
              dict(key="phases.shift.replay", values=(0.0, 0.01, 0.05, 0.25, 0.5), label="replay"))
    c.metrics = ("final/*", "forgetting/shift/*", "adaptation/shift/*")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
