"""Cache-reuse policies: one module per algorithm, each a config dataclass plus a :class:`Policy`.

A new policy is one module plus one line in :data:`POLICIES`: the module holds its config, its
:class:`Policy` (requirements by indicator and feature names, ``decide``, ``after_compute`` by name),
its example options (``Policy.examples``: the registry-driven tests run every policy with them) and,
when it can be calibrated, its ``Policy.calibration``. docs/policies.md, "Adding a policy".
"""

from __future__ import annotations

from .adacache import AdaCachePolicy
from .base import (
    Calibration,
    CalibrationFit,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
)
from .customcache import CustomCachePolicy
from .dbcache import DBCachePolicy
from .fbcache import FBCachePolicy
from .foca import FoCaPolicy
from .interval import IntervalPolicy
from .magcache import MagCachePolicy
from .none import NonePolicy
from .speca import SpeCaPolicy
from .taylorseer import TaylorSeerPolicy
from .teacache import TeaCachePolicy

#: Every policy by its option name. A new policy is one module plus one line here: options, the tests
#: (tests/test_policy_registry.py and the tests driven by ``examples``), calibration and profiles read it.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        NonePolicy,
        IntervalPolicy,
        TeaCachePolicy,
        TaylorSeerPolicy,
        AdaCachePolicy,
        CustomCachePolicy,
        FBCachePolicy,
        DBCachePolicy,
        MagCachePolicy,
        FoCaPolicy,
        SpeCaPolicy,
    )
}

__all__ = ["POLICIES", "Calibration", "CalibrationFit", "CallContext", "Policy", "PolicyConfig", "Requirements"]
