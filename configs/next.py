"""Next month's data: the demo's model keeps learning on a new domain, unicode (character names), while
replaying the old ones. A new plan that starts from the demo run's weights with a fresh optimizer at step 0.

    clt prepare demo --out data/demo                 # also builds data/demo/unicode
    clt train configs/demo.py --workdir runs/demo
    clt train configs/next.py --workdir runs/next    # model.init_from below; --init-from ckpt:DIR@STEP overrides
    clt report runs/next

1. unicode: re-warm to 1e-3 and re-decay on the new domain, replaying 25% prose and code. The demo's data is
   still on disk, so the replay is drawn from it with explicit weights (pro-rata weights would count only this
   plan's earlier phases). A run that exported a replay buffer can replay it instead:
   `replay_buffer.load=BUFFER "phases.0.replay={'share': 0.1, 'source': 'buffer'}"`.
2. anneal: a short linear anneal with the same mixture; its switch is the one the report measures (the switch
   from the demo's mixture is step 0 here: step 0's eval is the baseline to compare prose and code against).
Model and sequence length are the demo's: init_from needs the same model, a loaded buffer the same seq_len.
"""

import ml_collections

OLD = {"prose": 0.5, "code": 0.5}


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: the demo's, from its latest checkpoint
    c.model = dict(preset="demo", init_from="ckpt:runs/demo")

    # Data: the demo's domains plus the new one (all three from `clt prepare demo`)
    c.data = dict(domains={"prose": "data/demo/prose", "code": "data/demo/code", "unicode": "data/demo/unicode"},
                  seq_len=128, block_rows=256, eval_sequences=32, eval_batch=16)
    c.batch_size = 16

    # Phases
    c.phases = (
        dict(name="unicode", steps=160, mixture={"unicode": 1.0}, replay=dict(share=0.25, weights=OLD),
             schedule=dict(preset="rewarm_cosine", warmup=16, peak=1e-3, end=1e-4)),
        dict(name="anneal", steps=40, mixture={"unicode": 1.0}, replay=dict(share=0.25, weights=OLD),
             schedule=dict(kind="linear", peak=1e-4, end=1e-5)),
    )

    # Optimizer
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)

    # Monitoring and checkpointing
    c.monitor = dict(every=40, dense_every=10, dense_window=40)
    c.checkpoint = dict(every=100, keep=2)
    c.log = dict(every=20)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
