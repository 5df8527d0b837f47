"""Instruments: regularizers and diagnostics that plug into every trainer through one seam (base.py)."""

from rlx.instruments.base import (
    Instrument,
    InstrumentSet,
    LossContext,
    LossTerm,
    capture_loss_forward,
    log_metrics,
    register_instrument,
)

__all__ = [
    "Instrument",
    "InstrumentSet",
    "LossContext",
    "LossTerm",
    "capture_loss_forward",
    "log_metrics",
    "register_instrument",
]
