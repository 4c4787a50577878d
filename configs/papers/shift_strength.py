"""Sweep: how strong is each domain shift of the demo data? (the yardstick of every other paper sweep here)

    clt sweep configs/papers/shift_strength.py --workdir runs/papers/shift_strength

Two runs of configs/papers/continual.py, one per pair of domains: pre-train on `old` (phase base), then switch
to `new` (phase shift: re-warmed cosine, no replay). The shift strength is read at the end of the base phase:
end/base/new - end/base/old, how much worse a model trained on the old domain alone models the new one (in
nats/token; 0 = no shift). The shift phase then shows what the switch costs (forgetting of old) and gains
(adaptation to new) with no countermeasure.
- weak:   prose -> code (the stdlib sources contain the docstrings that make up much of the prose);
- strong: prose -> unicode (character names: a vocabulary and a syntax prose never shows).
Seeds: the config's one (add seeds=(0, 1, 2) with `c.seeds` for spread).
Size: size=N (N times the steps and the eval intervals).
"""

import ml_collections

PAIRS = {"weak": {"old": "data/demo/prose", "new": "data/demo/code"},
         "strong": {"old": "data/demo/prose", "new": "data/demo/unicode"}}


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/papers/continual.py"
    c.axes = (dict(key="data.domains", values=tuple(PAIRS.values()), label="shift", names=tuple(PAIRS)),)
    c.metrics = ("end/base/*", "final/*", "gap/shift/*", "forgetting/shift/*", "adaptation/shift/*")
    c.scaled = ("budget.steps", "monitor.every", "monitor.dense_every", "monitor.dense_window", "log.every")
    return c
