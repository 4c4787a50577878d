"""Sweep: replay share x re-warm peak of the smoke config's shift phase, a 2 x 2 grid of seconds-long runs.

    clt prepare demo --out data/demo
    clt sweep configs/sweeps/smoke_replay_peak.py --workdir runs/sweep --dry-run
    clt sweep configs/sweeps/smoke_replay_peak.py --workdir runs/sweep
    clt sweep report runs/sweep

A sweep config names a base experiment config (`base`, a path from the current folder, as for `clt train`),
overrides for every run (`overrides`, optional), the grid (`axes`: each entry is one axis, dict(key=..., values=
(...), label=..., names=(...)), or a zipped group dict(zip=(axis, axis, ...)) whose axes move together), the
seeds each point runs with (`seeds`, optional: the base config's own seed otherwise), and the metrics the report
shows (`metrics`, fnmatch patterns over final/<domain>, end/<phase>/<domain>, gap|recovery|forgetting|
adaptation/<switch>/<domain>, release/<phase>/<domain>, tokens_per_s). See clt/sweep.py and the README.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/smoke.py"

    # The grid: 2 x 2 runs, named e.g. replay=0.25,peak=3e-3 (the base seed: no seeds given)
    c.axes = (
        dict(key="phases.shift.replay", values=(0.0, 0.25), label="replay"),
        dict(key="phases.shift.schedule.peak", values=(1e-3, 3e-3), label="peak"),
    )

    # The report
    c.metrics = ("final/*", "gap/shift/*", "forgetting/shift/*", "adaptation/shift/*", "tokens_per_s")
    return c
