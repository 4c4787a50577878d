"""Paper reproductions, the two-phase plan: pre-train on an `old` domain, then continue on a `new` one.

    clt prepare demo --out data/demo
    clt train configs/papers/continual.py --workdir runs/papers/continual

Used by the sweeps of configs/papers/ (see REPRODUCTIONS.md). The domains are called `old` and `new` so that a
sweep can swap the pair with one override (`data.domains`), and every metric keeps its name:
- weak shift:   old = prose (pydoc, docstrings), new = code (stdlib sources, which contain those docstrings);
- strong shift: old = prose, new = unicode (character names: "LATIN SMALL LETTER A WITH GRAVE", ...).
configs/papers/shift_strength.py measures how strong each shift is.

Size: every length is a fraction of `budget.steps` (phases in percent, warmups and decays as fractions), so the
single override `budget.steps=N` scales the whole plan (the default, 400, runs in ~20-30 s on a 2-core CPU with
the `tiny` model); the monitor's intervals are in steps, so scale them with it (the sweeps of configs/papers/
take `size=N`, which multiplies both). On a larger machine also give a larger model and more data per step,
e.g. `clt sweep configs/papers/guo_gap.py --workdir DIR size=50 model.preset=demo data.seq_len=256 batch_size=64`.
"""

import ml_collections

PRETRAIN_PEAK = 3e-3  # the first phase's peak; the re-warm peaks of the sweeps are given relative to it


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(preset="tiny")
    c.data = dict(domains={"old": "data/demo/prose", "new": "data/demo/unicode"}, seq_len=64, block_rows=64,
                  eval_sequences=16, eval_batch=16)
    c.batch_size = 16
    c.budget = dict(steps=400)
    c.phases = (
        dict(name="base", percent=50, mixture={"old": 1.0},
             schedule=dict(kind="cosine", warmup=0.05, peak=PRETRAIN_PEAK, end=3e-4)),
        dict(name="shift", percent=50, mixture={"new": 1.0}, replay=0.0, optimizer="keep",
             schedule=dict(preset="rewarm_cosine", warmup=0.01, peak=PRETRAIN_PEAK, end=3e-4)),
    )
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)
    c.monitor = dict(every=20, dense_every=4, dense_window=40)
    c.checkpoint = dict(every=0, keep=1)
    c.log = dict(every=20)
    return c
