"""Warmup-stable-decay with a 1-sqrt decay over the last 20% (Haegele et al. 2024: 10-20% is the sweet spot)."""


def get_config():
    return dict(kind="wsd", warmup=0.01, peak=3e-4, end=0.0, decay=0.2, shape="1-sqrt")
