"""Plain warmup + cosine decay from 3e-4 to 3e-5, 10% of this peak (`end` is absolute: override both together)."""


def get_config():
    return dict(kind="cosine", warmup=0.02, peak=3e-4, end=3e-5)
