"""Smoke: the demo's shape, tiny, finishing in seconds on a CPU (tests and quick checks).

    clt prepare demo --out data/demo
    clt train configs/smoke.py --workdir runs/smoke
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model
    c.model = dict(preset="tiny")

    # Data
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code"}, seq_len=32, block_rows=64,
                  eval_sequences=8, eval_batch=8)
    c.batch_size = 8

    # Phases
    c.phases = (
        dict(name="base", steps=12, mixture={"prose": 1.0}, schedule=dict(kind="cosine", warmup=2, peak=3e-3)),
        dict(name="shift", steps=10, mixture={"code": 1.0}, replay=0.25,
             schedule=dict(kind="cosine", warmup=2, peak=2e-3, end=2e-4)),
        dict(name="anneal", steps=6, mixture={"code": 1.0}, replay=0.25,
             schedule=dict(kind="linear", peak=2e-4, end=2e-5),
             upsample=dict(last=0.5, mixture={"code": 0.7, "prose": 0.3})),
    )

    # Monitoring and checkpointing
    c.monitor = dict(every=6, dense_every=2, dense_window=4)
    c.checkpoint = dict(every=8, keep=2)
    c.log = dict(every=2)
    return c
