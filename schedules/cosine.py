"""Plain warmup + cosine decay to 10% of the peak (the usual pre-training schedule)."""


def get_config():
    return dict(kind="cosine", warmup=0.02, peak=3e-4, end=3e-5)
