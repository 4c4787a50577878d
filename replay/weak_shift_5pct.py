"""5% replay of earlier phases' data, pro rata: enough for a weak shift (Ibrahim et al. 2024)."""


def get_config():
    return dict(share=0.05, source="mixture")
