"""Power scheduler (Shen et al. 2024): eta = min(peak, batch * a * tokens**b), published a = 4, b = -0.51,
peak 0.02 under muP; a standard-parametrised model needs its own `a`. Exponential decay over the last 10%."""


def get_config():
    return dict(kind="power", warmup=0.01, peak=0.02, a=4.0, b=-0.51, decay=0.1, end=2e-5)
