"""Sweep: a continual pre-training recipe for the demo, by ablation: replay share x re-warm (peak and warmup
together) x re-warm schedule x upsampling window, over 2 seeds: 2 x 2 x 2 x 2 points x 2 seeds = 32 runs of
configs/demo.py (about 5 minutes each on a 2-core CPU).

    clt prepare demo --out data/demo
    clt sweep configs/sweeps/demo_recipe.py --workdir runs/recipe --dry-run
    clt sweep configs/sweeps/demo_recipe.py --workdir runs/recipe      # resumable: rerun it after any stop
    clt sweep report runs/recipe                                       # works mid-sweep

Fields: see configs/sweeps/smoke_replay_peak.py. Overrides apply in order (the sweep's, the command line's, then
the axes in the order below), so the schedule axis comes before the zipped group that sets fields inside it.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base = "configs/demo.py"
    c.overrides = ("checkpoint.keep=1",)  # 32 runs: keep the disk small (phase ends are always kept)

    # The grid
    c.axes = (
        dict(key="phases.shift.replay", values=(0.1, 0.25), label="replay"),
        dict(key="phases.shift.schedule", values=(dict(preset="rewarm_cosine", end=2e-4),
                                                  dict(preset="wsd_1sqrt_20", end=2e-4)),
             label="sched", names=("cos", "wsd")),
        dict(zip=(
            dict(key="phases.shift.schedule.peak", values=(1e-3, 3e-3), label="peak"),
            dict(key="phases.shift.schedule.warmup", values=(10, 40), label="warmup"),
        )),
        dict(key="phases.anneal.upsample.last", values=(0.25, 0.5), label="upsample"),
    )
    c.seeds = (0, 1)

    # The report: held-out loss at the end, and what the prose -> code switch cost and gained
    c.metrics = ("final/*", "gap/shift/*", "recovery/shift/*", "forgetting/shift/*", "adaptation/shift/*",
                 "tokens_per_s")
    return c
