"""Paper reproductions, the three-task plan: prose, then code, then unicode (Ibrahim et al. 2024's sequence of
tasks), each phase on its new domain alone, re-warmed cosine in every phase (the sweep swaps the schedules).

    clt prepare demo --out data/demo
    clt train configs/papers/three_domains.py --workdir runs/papers/three

Size: `budget.steps=N` scales the plan (default 600: three phases of 200 steps, ~40 s on a 2-core CPU); the
sweep's `size=N` scales the monitor's intervals with it.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="tiny")
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code", "unicode": "data/demo/unicode"},
                  seq_len=64, block_rows=64, eval_sequences=16, eval_batch=16)
    c.batch_size = 16
    c.budget = dict(steps=600)
    cos = dict(kind="cosine", warmup=0.025, peak=3e-3, end=3e-4)
    c.phases = (
        dict(name="t1", percent=100 / 3, mixture={"prose": 1.0}, schedule=dict(cos, warmup=0.05)),
        dict(name="t2", percent=100 / 3, mixture={"code": 1.0}, schedule=dict(cos)),
        dict(name="t3", percent=100 / 3, mixture={"unicode": 1.0}, schedule=dict(cos)),
    )
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)
    c.monitor = dict(every=25, dense_every=5, dense_window=40)
    c.checkpoint = dict(every=0, keep=1)
    c.log = dict(every=25)
    return c
