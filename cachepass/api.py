"""User-facing helpers on a compiled model: ``stats``, ``reset`` (``explain`` lives in explain.py)."""

from __future__ import annotations

from .explain import explain
from .runtime.state import Stats, runtime_for


def stats(model) -> Stats:
    """Per stream, which steps computed the blocks and which reused the cache (current generation),
    plus the previous generations and totals. ``model`` is the compiled or the original module."""
    runtime = runtime_for(model, create=False)
    if runtime is None:
        return Stats(None, False, "this model was never run with backend='cachepass'", 0, [], [], 0, 0)
    return runtime.stats()


def reset(model) -> None:
    """Forget every cache and the step position: the next call starts a new generation."""
    runtime = runtime_for(model, create=False)
    if runtime is not None:
        runtime.reset()


__all__ = ["explain", "reset", "stats"]
