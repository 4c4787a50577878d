"""Demo: continual pre-training on real text that every Python install has, in three phases.

    clt prepare demo --out data/demo
    clt train configs/demo.py --workdir runs/demo

1. base:   pre-train on English prose (stdlib docs and docstrings), warmup + cosine.
2. shift:  switch to Python code with a re-warm and re-decay, replaying 25% prose so it is not forgotten.
3. anneal: a short anneal that upsamples code at the end.
The prose -> code switch is a real distribution shift: watch its stability gap in `clt report runs/demo`.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model
    c.model = dict(preset="demo")

    # Data
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code"}, seq_len=128, block_rows=256,
                  eval_sequences=32, eval_batch=16)
    c.batch_size = 16

    # Phases
    c.phases = (
        dict(name="base", steps=400, mixture={"prose": 1.0},
             schedule=dict(kind="cosine", warmup=30, peak=3e-3, end=3e-4)),
        dict(name="shift", steps=300, mixture={"code": 1.0}, replay="strong_shift_25pct",
             schedule=dict(preset="rewarm_cosine", warmup=20, peak=2e-3, end=2e-4), optimizer="keep"),
        dict(name="anneal", steps=100, mixture={"code": 1.0}, replay=0.25,
             schedule=dict(kind="linear", peak=2e-4, end=2e-5),
             upsample=dict(last=0.5, mixture={"code": 0.7, "prose": 0.3})),
    )

    # Optimizer
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)

    # Monitoring and checkpointing
    c.monitor = dict(every=50, dense_every=10, dense_window=100)
    c.checkpoint = dict(every=200, keep=2)
    c.log = dict(every=25)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
