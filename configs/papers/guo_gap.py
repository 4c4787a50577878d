"""Sweep: Guo et al. 2024 ("Efficient Continual Pre-training by Mitigating the Stability Gap"): at a switch to a
new domain performance first drops (the stability gap) before it recovers; three strategies make the gap
shallower and the recovery faster: (1) several epochs on a subset of the new data instead of one pass over all
of it, (2) a high-quality subset (in the paper's final version: chosen by relevance to the domain), (3) a data
mixture close to the pre-training data.

    clt sweep configs/papers/guo_gap.py --workdir runs/papers/guo_gap

Runs of configs/papers/continual.py, all the same 200 + 200 steps with dense eval every 2 steps over the first 60
after the switch, on both shifts (weak: prose -> code, where the old domain's loss rises and then recovers, the
paper's gap; strong: prose -> unicode, where it does not recover without old data). The shift phase trains on:
- full:    the whole new domain, one pass (less than one: 205K tokens of 2.6M code or 1.3M unicode);
- subset:  `sub`, a spread-out 1/20 of the new domain's training documents (every 20th: ~2 epochs of code,
           ~3 of unicode in the phase);
- quality: `top`, as many bytes of the documents most relevant to the new domain: the lowest Moore-Lewis
           cross-entropy difference H_new(x) - H_old(x) under byte 4-gram models of the new domain's other
           documents and of the old domain (the same epochs as `subset`);
- mix:     50% new + 50% old (prose): a mixture closer to the pre-training data (as Ibrahim's replay).
benchmarks/reproductions.py prepares `sub` and `top` into data/demo_guo/<new domain>/ from `clt prepare demo`'s
text, without the documents of the held-out split: `new` (the whole domain's held-out split) is the new domain's
metric in every run.
Scaled down: a 0.1M-parameter model and 410K tokens instead of OpenLLaMA-3B/Llama-3-8B on billions of medical
tokens, held-out loss instead of medical QA accuracy, byte n-gram models as the relevance scorer; three seeds.
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

OLD = "data/demo/prose"
PAIRS = {shift: {"old": OLD, "new": f"data/demo/{new}", "sub": f"data/demo_guo/{new}/sub",
                 "top": f"data/demo_guo/{new}/top"} for shift, new in (("weak", "code"), ("strong", "unicode"))}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.overrides = ("monitor.dense_every=2", "monitor.dense_window=60")
    c.axes = (dict(key="data.domains", values=tuple(PAIRS.values()), label="shift", names=tuple(PAIRS)),
              dict(key="phases.shift.mixture",
                   values=({"new": 1.0}, {"sub": 1.0}, {"top": 1.0}, {"new": 0.5, "old": 0.5}),
                   label="data", names=("full", "subset", "quality", "mix")))
    c.seeds = (0, 1, 2)
    c.metrics = ("final/old", "final/new", "gap/shift/old", "gap/shift/new", "recovery/shift/old",
                 "recovery/shift/new", "forgetting/shift/old", "adaptation/shift/new")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
