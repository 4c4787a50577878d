"""25% replay of earlier phases' data, pro rata: what a strong shift (e.g. English -> code) needs."""


def get_config():
    return dict(share=0.25, source="mixture")
