"""Paper reproductions, the one-phase plan: pre-training on a fixed mix of the three demo domains.

    clt prepare demo --out data/demo
    clt train configs/papers/pretrain.py --workdir runs/papers/pretrain

Used by the schedule (Hägele et al. 2024) and upsampling (Blakeney et al. 2024) sweeps of configs/papers/. The
mix is mostly prose with some code and a little unicode (character names), the shape of an LLM mix with a large
general domain and smaller specialised ones.

Size: as configs/papers/continual.py, `budget.steps=N` scales the plan (warmup, decay, cooldown and upsampling
windows are fractions of it; the sweeps' `size=N` scales the monitor's intervals too); the default 400 steps of
the `tiny` model run in ~20-30 s on a 2-core CPU.
"""

import ml_collections

MIX = {"prose": 0.6, "code": 0.3, "unicode": 0.1}


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="tiny")
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code", "unicode": "data/demo/unicode"},
                  seq_len=64, block_rows=64, eval_sequences=16, eval_batch=16)
    c.batch_size = 16
    c.budget = dict(steps=400)
    c.phases = (
        dict(name="main", percent=100, mixture=dict(MIX),
             schedule=dict(kind="cosine", warmup=0.025, peak=3e-3, end=3e-4)),
    )
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)
    c.monitor = dict(every=20, dense_every=4, dense_window=40)
    c.checkpoint = dict(every=0, keep=1)
    c.log = dict(every=20)
    return c
