"""Lightning's messages that are not about the run: its advertisement for litlogger, printed by every Trainer, and
deprecation warnings its own code raises inside torch. `crate train` drops these; workflows, whose logs hold
several runs, also drop its device banners."""

from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: " not in record.getMessage()


def quiet_lightning(banners: bool = True) -> None:
    """Filter Lightning's tips and its own deprecation warnings; `banners=False` also its INFO lines ("GPU
    available", ...). Lightning sets up its loggers on import, so import it first, then change them."""
    import lightning.pytorch  # noqa: F401

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [logger, *logger.handlers]:  # a logger's filter does not see its children's records
            if not any(isinstance(f, _NoTips) for f in handler.filters):
                handler.addFilter(_NoTips())
        if not banners:
            logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")  # lightning's pytree use, deprecated by torch
