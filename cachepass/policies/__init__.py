"""Cache-reuse policies: one module per algorithm, each a config dataclass plus a :class:`Policy`."""

from __future__ import annotations

from .base import CallContext, Policy, PolicyConfig, Requirements
from .interval import IntervalPolicy
from .none import NonePolicy

#: Every policy by its option name. A new policy is one module plus one line here.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        NonePolicy,
        IntervalPolicy,
    )
}

__all__ = ["POLICIES", "CallContext", "Policy", "PolicyConfig", "Requirements"]
