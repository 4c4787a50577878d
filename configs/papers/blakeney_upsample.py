"""Sweep: Blakeney et al. 2024 ("Does your data spark joy? Performance gains from domain upsampling at the end
of training"): upsampling a domain over the last part of training improves that domain at a small cost to the
rest; 10-20% of training is the best trade-off (shorter gains less, longer costs the general domains more).

    clt sweep configs/papers/blakeney_upsample.py --workdir runs/papers/blakeney_upsample

Five runs of configs/papers/pretrain.py (prose .6, code .3, unicode .1, cosine decay): the base mix throughout,
and code upsampled to .7 (prose .25, unicode .05) over the last 5, 10, 20, 30% of training, at equal steps.
The target domain is code (the paper's math/code benchmarks); prose is the general domain. Scaled down: a
0.1M-parameter model and 400 steps instead of 7B models and 1T tokens, eval loss instead of benchmarks; three
seeds. Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

UPSAMPLED = {"code": 0.7, "prose": 0.25, "unicode": 0.05}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/pretrain.py"
    c.axes = (dict(key="phases.main.upsample",
                   values=(None, *(dict(last=f, mixture=dict(UPSAMPLED)) for f in (0.05, 0.1, 0.2, 0.3))),
                   label="upsample", names=("none", "5pct", "10pct", "20pct", "30pct")),)
    c.seeds = (0, 1, 2)
    c.metrics = ("final/*",)
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
