"""``none``: always compute. The control policy: the cached program must equal the plain compile."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, PolicyConfig, Requirements


@dataclass(frozen=True)
class NoneConfig(PolicyConfig):
    pass


class NonePolicy(Policy):
    name = "none"
    config_class = NoneConfig
    examples = {"tiny": {}}  # never reuses: the tests check it computes every call

    def requirements(self) -> Requirements:
        return Requirements(indicator=None, reuses=False)

    def decide(self, state, ctx, indicator) -> bool:
        return True
