"""Re-warmed cosine (Ibrahim et al. 2024 / Gupta et al. 2023): re-warm over 1% of the phase to the peak, cosine to 10%."""


def get_config():
    return dict(kind="cosine", warmup=0.01, peak=3e-4, end=3e-5)
