"""Infinite schedule with an inverse-sqrt cooldown (Ibrahim et al. 2024), otherwise as infinite_cosine."""


def get_config():
    return dict(kind="infinite", warmup=0.01, peak=3e-4, const=1.65e-4, end=3e-5, cooldown=0.6,
                shape="inverse_sqrt", alpha=1.0, anneal_shape="exponential")
