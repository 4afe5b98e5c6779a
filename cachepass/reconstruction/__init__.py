"""How a skipped call rebuilds what it skipped (see :mod:`cachepass.reconstruction.base`): reuse the
last residual as it is, predict it by a Taylor expansion (:mod:`cachepass.reconstruction.taylor`), or by
FoCa's predictor-corrector in real time (:mod:`cachepass.reconstruction.foca`)."""

from __future__ import annotations

from .base import (
           ADDED_PREFIX,
           GRANULARITIES,
           Reconstruction,
           ResidualReuse,
           ReuseCache,
           check_cache_layout,
)
from .foca import CLOCKS, FoCaReuse, foca_weights
from .taylor import MAX_ORDER, TaylorReuse

__all__ = ["ADDED_PREFIX", "CLOCKS", "GRANULARITIES", "MAX_ORDER", "FoCaReuse", "foca_weights", "Reconstruction", "ResidualReuse", "ReuseCache", "TaylorReuse",
           "check_cache_layout"]
