"""clt: a continual pre-training orchestrator (phase plans, LR re-warming, replay, stability-gap monitoring)."""

__version__ = "0.1.0"
