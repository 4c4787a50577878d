"""Sweep: Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"; also
MiniCPM, Hu et al. 2024): warmup-stable-decay with a 1-sqrt cooldown matches (or beats) cosine at an equal
budget, and a longer cooldown helps up to ~20% of training, where the gains plateau.

    clt sweep configs/papers/hagele_wsd.py --workdir runs/papers/hagele_wsd

Five runs of configs/papers/pretrain.py (one phase on the prose/code/unicode mix), equal steps and peak: cosine
to 10% of the peak (the usual baseline), and WSD with a 1-sqrt cooldown to 0 over the last 5, 10, 20, 30%.
Scaled down: a 0.1M-parameter model and 400 steps instead of 124M-360M models and billions of tokens. Three seeds
(15 runs, ~6 minutes on a 2-core CPU): the differences between cooldowns are a few hundredths of a nat.
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

PEAK = 3e-3


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/pretrain.py"
    wsd = lambda decay: dict(kind="wsd", warmup=0.025, peak=PEAK, end=0.0, decay=decay, shape="1-sqrt")  # noqa
    c.axes = (dict(key="phases.main.schedule",
                   values=(dict(kind="cosine", warmup=0.025, peak=PEAK, end=3e-4),
                           wsd(0.05), wsd(0.1), wsd(0.2), wsd(0.3)),
                   label="sched", names=("cosine", "wsd5", "wsd10", "wsd20", "wsd30")),)
    c.seeds = (0, 1, 2)
    c.metrics = ("final/*",)
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
