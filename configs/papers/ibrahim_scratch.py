"""Sweep: the baseline of Ibrahim et al. 2024 (see configs/papers/ibrahim_replay.py): a model trained from scratch
on the union of both domains, with the compute of the continual runs (400 steps: base + shift).

    clt sweep configs/papers/ibrahim_scratch.py --workdir runs/papers/ibrahim_scratch

Two runs of configs/papers/continual.py with its two phases replaced by one: 100% of the budget on a 50/50 mix
of old and new (both domains have more rows than 200 steps read, so this is the union as the runs see it),
warmup 2.5% (the base phase's 10 steps) and cosine 3e-3 -> 3e-4; the weak and the strong pair.
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

PAIRS = {"weak": {"old": "data/demo/prose", "new": "data/demo/code"},
         "strong": {"old": "data/demo/prose", "new": "data/demo/unicode"}}
UNION = (dict(name="union", percent=100, mixture={"old": 0.5, "new": 0.5},
              schedule=dict(kind="cosine", warmup=0.025, peak=3e-3, end=3e-4)),)


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.overrides = (f"phases={UNION!r}",)
    c.axes = (dict(key="data.domains", values=tuple(PAIRS.values()), label="shift", names=tuple(PAIRS)),)
    c.metrics = ("final/*",)
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
