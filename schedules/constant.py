"""Constant LR after a short warmup (for ablations and for probing a model without a decay)."""


def get_config():
    return dict(kind="constant", warmup=0.01, peak=3e-4)
