"""rlx: RL post-training with interpretability instruments."""

__version__ = "0.1.0"
