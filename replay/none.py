"""No replay."""


def get_config():
    return dict(share=0.0)
