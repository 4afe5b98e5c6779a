"""One place to get the ``cachepass`` loggers, so every message is filterable under that name, and the
"warn once per cause" helper every repeated warning goes through."""

from __future__ import annotations

import logging
import threading
from typing import Any, Hashable

_warned: set = set()  # keys already warned about in this process (see warn_once)
_warned_lock = threading.Lock()
_MAX_KEYS = 100_000  # a bound on the memory the keys hold; past it, repeats are warned again (never lost)


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``cachepass.<name>`` (``name`` may already start with ``cachepass``)."""
    if not name.startswith("cachepass"):
        name = f"cachepass.{name}"
    return logging.getLogger(name)


def warn_once(logger: logging.Logger, key: Hashable, message: str, *args: Any) -> bool:
    """Log ``message % args`` at WARNING the first time ``key`` is seen in this process, at DEBUG after.

    ``key`` says what the warning is about, chosen by the caller so that one cause warns once: it should
    hold the kind of warning and whatever identifies its cause (the model's identity or fingerprint, the
    profile file, the step counts...), e.g. ``("profile-model", source, digest)``. Returns ``True`` when the
    message went out at WARNING."""
    with _warned_lock:
        first = key not in _warned
        if first:
            if len(_warned) >= _MAX_KEYS:
                _warned.clear()
            _warned.add(key)
    logger.log(logging.WARNING if first else logging.DEBUG, message, *args)
    return first


def reset_warnings() -> None:
    """Forget which warnings were given, so each warns again (tests; a long-lived process that wants them)."""
    with _warned_lock:
        _warned.clear()
