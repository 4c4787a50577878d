"""Sweep: Guo et al. 2024 ("Efficient Continual Pre-training by Mitigating the Stability Gap"): at a switch to a
new domain performance first drops (the stability gap) before it recovers; three strategies make the gap
shallower and the recovery faster: (1) several epochs on a subset of the new data instead of one pass over all
of it, (2) a high-quality subset, (3) a data mixture close to the pre-training data.

    clt sweep configs/papers/guo_gap.py --workdir runs/papers/guo_gap

Three runs of configs/papers/continual.py on the strong shift (prose -> unicode), all the same 200 + 200 steps,
dense eval every 2 steps over the first 60 after the switch; the shift phase trains on:
- full:   the whole new domain, one pass (less than one: 205K of its 1.3M tokens);
- subset: `sub`, a spread-out 1/20 of the unicode table (every 20th document, ~65K tokens: ~3 epochs in the
          phase), prepared by benchmarks/reproductions.py into data/demo_guo/sub (from `clt prepare demo`'s text);
- mix:    50% new + 50% old (prose): a mixture closer to the pre-training data (as Ibrahim's replay);
`new` (the whole unicode domain's held-out split) is the new domain's metric in all three.
Not reproduced: (2) the high-quality subset: the demo domains have no quality signal (no classifier score, no
curated vs raw split), and a made-up score would test the proxy, not the paper.
Scaled down: a 0.1M-parameter model and 410K tokens instead of OpenLLaMA-3B/Llama-3-8B on billions of medical
tokens, held-out loss instead of medical QA accuracy; one seed. Size: budget.steps=N.
"""

import ml_collections

DOMAINS = {"old": "data/demo/prose", "new": "data/demo/unicode", "sub": "data/demo_guo/sub"}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.overrides = (f"data.domains={DOMAINS!r}", "monitor.dense_every=2", "monitor.dense_window=60")
    c.axes = (dict(key="phases.shift.mixture", values=({"new": 1.0}, {"sub": 1.0}, {"new": 0.5, "old": 0.5}),
                   label="data", names=("full", "subset", "mix")),)
    c.metrics = ("final/old", "final/new", "gap/shift/old", "gap/shift/new", "recovery/shift/old",
                 "recovery/shift/new", "forgetting/shift/old", "adaptation/shift/new")
    return c
