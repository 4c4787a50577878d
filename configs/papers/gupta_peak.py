"""Sweep: Gupta et al. 2023 ("Continual Pre-Training of Large Language Models: How to (re)warm your model?"),
the re-warm peak: a higher maximum LR forgets more of the old domain and adapts more to the new one; not
re-warming at all (continuing at the final LR of pre-training) forgets least and adapts least.

    clt sweep configs/papers/gupta_peak.py --workdir runs/papers/gupta_peak

Four runs of configs/papers/continual.py on the weak shift (prose -> code): the shift phase re-warms over 1% to a
peak of 3e-4 (= the end LR of pre-training: no re-warm, a constant LR), 1e-3, 3e-3 (= the pre-training peak) and
6e-3, then cosine to 3e-4. Scaled down as configs/papers/gupta_warmup.py (three seeds).
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

WEAK = {"old": "data/demo/prose", "new": "data/demo/code"}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.overrides = (f"data.domains={WEAK!r}", "monitor.dense_every=2")
    c.axes = (dict(key="phases.shift.schedule.peak", values=(3e-4, 1e-3, 3e-3, 6e-3), label="peak"),)
    c.seeds = (0, 1, 2)
    c.metrics = ("final/*", "gap/shift/*", "recovery/shift/*", "forgetting/shift/*", "adaptation/shift/*")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
