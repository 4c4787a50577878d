"""Infinite schedule, cosine cooldown (Ibrahim et al. 2024, their 405M values): warmup, cooldown over 60% of
the first task to eta_const, constant across later phases; a phase that ends a task sets `anneal`."""


def get_config():
    return dict(kind="infinite", warmup=0.01, peak=3e-4, const=1.65e-4, end=3e-5, cooldown=0.6, shape="cosine",
                anneal_shape="exponential")
