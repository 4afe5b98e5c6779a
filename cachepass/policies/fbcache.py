"""``fbcache``: run the first block every call; skip the rest while its residual barely moved.

First-Block-Cache (ParaAttention; diffusers' ``FirstBlockCache``). Block 0 is computed on every call
(``compute_first=1``) and its residual ``r = out_0 - in_0`` is the indicator (``front_residual``): the
call reuses the cached residual of blocks ``1..N-1`` while ``mean|r - r_ref| / mean|r_ref| < threshold``,
where ``r_ref`` is the first block's residual at the last *computed* call of the branch (so slow drift
accumulates until it recomputes). The residual, not the block's output, as diffusers and cache-dit
compare: the output carries the whole residual stream, whose size hides the change, so thresholds carry over.
The ``warmup`` first steps and the ``final_steps`` last ones (step count known) are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..reconstruction import Reconstruction, ResidualReuse
from .base import (
    MAX_STEPS,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
    check_float,
    check_int,
    is_forced_step,
)
from .distance import relative_l1


@dataclass(frozen=True)
class FBCacheConfig(PolicyConfig):
    threshold: float = 0.1  # diffusers 0.05, ParaAttention 0.08: both compute > half the steps on digits
    warmup: int = 1
    final_steps: int = 0

    def validate(self) -> None:
        check_float("threshold", self.threshold, minimum=0.0)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)
        check_int("final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS)


@dataclass
class ReferenceState:
    reference: Any = None  # the indicator at the last computed call
    distances: list = field(default_factory=list)  # relative change per decided call, for inspection


def decide_against_reference(state: ReferenceState, ctx: CallContext, indicator, threshold: float,
                             forced: bool) -> bool:
    """Compute (and take ``indicator`` as the new reference) when forced, without a reference, or when
    the relative L1 change against the reference reaches ``threshold``; else reuse."""
    if not forced and state.reference is not None:
        distance = relative_l1(indicator, state.reference, ctx.sync)
        state.distances.append(distance)
        if distance < threshold:
            return False
    state.reference = indicator.detach().clone()
    return True


class FBCachePolicy(Policy):
    name = "fbcache"
    config_class = FBCacheConfig
    examples = {
        "tiny": {},
        # on the front residual, which moves a lot in the random sequence-parallel model; chosen so that two
        # latents give different schedules and unsynchronised shards diverge (tests/test_distributed.py)
        "sequence_parallel": {"threshold": 0.44},
    }

    def reconstruction(self) -> Reconstruction:
        return ResidualReuse()

    def requirements(self) -> Requirements:
        return Requirements(indicator="front_residual", compute_first=1, reconstruction=self.reconstruction())

    def new_state(self) -> ReferenceState:
        return ReferenceState()

    def decide(self, state: ReferenceState, ctx: CallContext, indicator) -> bool:
        c = self.config
        forced = is_forced_step(ctx, c.warmup, c.final_steps)
        return decide_against_reference(state, ctx, indicator, c.threshold, forced)

    def device_rule(self):
        """``decisions="device"``: the same rule on the device (``cachepass/transform/device_variant.py``):
        reuse while the relative L1 change against the indicator at the last computed call is below the
        threshold; ``warmup`` first and ``final_steps`` last steps forced."""
        from ..transform.device_variant import DeviceRule

        c = self.config
        return DeviceRule(threshold=c.threshold, reference="computed", first=c.warmup, last=c.final_steps)
