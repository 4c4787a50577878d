"""10% replay from the persistent replay buffer, for when the old corpus is no longer kept (needs
replay_buffer.capacity or replay_buffer.load)."""


def get_config():
    return dict(share=0.10, source="buffer")
