"""One place to get the ``cachepass`` loggers, so every message is filterable under that name."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``cachepass.<name>`` (``name`` may already start with ``cachepass``)."""
    if not name.startswith("cachepass"):
        name = f"cachepass.{name}"
    return logging.getLogger(name)
