"""How a skipped call rebuilds what it skipped (see :mod:`cachepass.reconstruction.base`): reuse the
last residual as it is, or predict it by a Taylor expansion (:mod:`cachepass.reconstruction.taylor`)."""

from __future__ import annotations

from .base import (
           ADDED_PREFIX,
           GRANULARITIES,
           Reconstruction,
           ResidualReuse,
           ReuseCache,
           check_cache_layout,
)
from .taylor import MAX_ORDER, TaylorReuse

__all__ = ["ADDED_PREFIX", "GRANULARITIES", "MAX_ORDER", "Reconstruction", "ResidualReuse", "ReuseCache", "TaylorReuse",
           "check_cache_layout"]
