"""Cache-reuse policies: one module per algorithm, each a config dataclass plus a :class:`Policy`."""

from __future__ import annotations

from .adacache import AdaCachePolicy
from .base import CallContext, Policy, PolicyConfig, Requirements
from .customcache import CustomCachePolicy
from .dbcache import DBCachePolicy
from .fbcache import FBCachePolicy
from .interval import IntervalPolicy
from .magcache import MagCachePolicy
from .none import NonePolicy
from .taylorseer import TaylorSeerPolicy
from .teacache import TeaCachePolicy

#: Every policy by its option name. A new policy is one module plus one line here.
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
    )
}

__all__ = ["POLICIES", "CallContext", "Policy", "PolicyConfig", "Requirements"]
