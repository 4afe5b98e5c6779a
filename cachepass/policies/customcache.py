"""``customcache``: TeaCache's decision, TaylorSeer's reconstruction of the whole-stack residual.

The reference's combination: skip exactly when ``teacache`` would (``ret_steps=False``, threshold
0.26 by default), but rebuild a skipped call as ``x_in + R + k * dR`` (order 1: ``dR`` the residual's
change per step between the last two computed steps, ``k`` the steps since the last one) instead of
``x_in + R``. Higher ``order`` uses more computed steps (:mod:`cachepass.reconstruction.taylor`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reconstruction import MAX_ORDER, TaylorReuse
from .base import Requirements, check_int
from .teacache import TeaCacheConfig, TeaCachePolicy


@dataclass(frozen=True)
class CustomCacheConfig(TeaCacheConfig):
    threshold: float = 0.26
    order: int = 1

    def validate(self) -> None:
        super().validate()
        check_int("order", self.order, minimum=1, maximum=MAX_ORDER)


class CustomCachePolicy(TeaCachePolicy):
    name = "customcache"
    config_class = CustomCacheConfig
    calibration = None  # reads teacache profiles (option ``profile``); not calibrated itself
    examples = {
        "tiny": {"coefficients": "identity", "threshold": 0.3},
        # on the timestep embedding, whole on every sequence-parallel rank
        "sequence_parallel": {"coefficients": "identity", "threshold": 1.0},
    }

    def requirements(self) -> Requirements:
        return Requirements(indicator=self.config.indicator, reconstruction=TaylorReuse(order=self.config.order))
