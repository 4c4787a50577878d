"""Sweep: Gupta et al. 2023 ("Continual Pre-Training of Large Language Models: How to (re)warm your model?"),
the warmup length: re-warming the LR on new data first raises the loss on old and new data (a gap), then
improves the new domain; the warmup's length matters little (0, 0.5, 1, 2% of the phase).

    clt sweep configs/papers/gupta_warmup.py --workdir runs/papers/gupta_warmup

Four runs of configs/papers/continual.py on the weak shift (prose -> code; the paper's Pile -> SlimPajama is a
weak shift too): the shift phase re-warms to the pre-training peak (3e-3) over 0, 0.5, 1, 2% of its steps, then
cosine to 3e-4. Dense eval (every 2 steps over the first 40) shows the gap. Scaled down: a 0.1M-parameter model,
200 + 200 steps instead of a 410M Pythia and 45B tokens; three seeds.
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

WEAK = {"old": "data/demo/prose", "new": "data/demo/code"}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.overrides = (f"data.domains={WEAK!r}", "monitor.dense_every=2")
    c.axes = (dict(key="phases.shift.schedule.warmup", values=(0, 0.005, 0.01, 0.02), label="warmup",
                   names=("0pct", "0.5pct", "1pct", "2pct")),)
    c.seeds = (0, 1, 2)
    c.metrics = ("final/*", "gap/shift/*", "recovery/shift/*", "forgetting/shift/*", "adaptation/shift/*")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
