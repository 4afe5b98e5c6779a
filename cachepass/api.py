"""User-facing helpers on a compiled model: ``stats``, ``reset`` (``explain`` lives in explain.py)."""

from __future__ import annotations

from .explain import explain
from .runtime.state import Stats, runtime_for


def stats(model) -> Stats:
    """Per branch (cond, uncond: ``Stats.branches``), which steps computed the blocks and which reused the
    cache (current generation), plus the previous generations and totals, for this module instance (the
    compiled or the original module; another instance of the same class has its own)."""
    runtime = runtime_for(model, create=False)
    if runtime is None:
        return Stats(None, False, "this model was never run with backend='cachepass'", 0, [], [], 0, 0)
    return runtime.stats()


def reset(model) -> None:
    """Forget this instance's caches and step position: the next call starts a new generation (inside a
    diffusers pipeline this happens by itself at the end of every pipeline call)."""
    runtime = runtime_for(model, create=False)
    if runtime is not None:
        runtime.reset()


__all__ = ["explain", "reset", "stats"]
