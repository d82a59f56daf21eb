"""Logging set-up for every dicomflow process: one format, level from settings."""

from __future__ import annotations

import logging

__all__ = ["setup_logging", "FORMAT"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str) -> None:
    """Configure the root logger once (a no-op when handlers exist, e.g. under Faust's worker)."""
    logging.basicConfig(level=level, format=FORMAT)
