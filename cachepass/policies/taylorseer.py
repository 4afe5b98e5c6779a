"""``taylorseer``: compute on a fixed schedule and predict the skipped steps by a Taylor expansion.

TaylorSeer (arXiv 2503.06923). After ``warmup`` computed steps, one step in ``interval`` is computed
(``warmup=1, interval=4``: steps 0, 4, 8, ..., 13 of 50, the reference's schedule). In between, the
cached span's residual is predicted as ``F^ = sum_i D_i k^i / i!`` from derivatives fitted on the last
``order + 1`` computed steps with their real gaps (:mod:`cachepass.reconstruction.taylor`,
:class:`~cachepass.reconstruction.TaylorReuse`).

Granularity ``stack`` applies this to the whole-stack residual (``order + 1`` residual-sized tensors
per branch). Granularity ``block`` is the paper's: every block's attention and feed-forward outputs
are cached and predicted, and the rest of each block (norms, modulation, gates, residual adds) is
recomputed with the current step's inputs; those parts are found by
:mod:`cachepass.analysis.block_parts` and removed from the reuse variant. It costs ``order + 1``
tensors per part output per block and branch (Wan: 3 per block).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reconstruction import GRANULARITIES, MAX_ORDER, TaylorReuse
from .base import (
    MAX_STEPS,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
    check_choice,
    check_int,
    is_forced_step,
)


@dataclass(frozen=True)
class TaylorSeerConfig(PolicyConfig):
    interval: int = 4
    order: int = 1
    warmup: int = 1
    final_steps: int = 1  # the last step, when the step count is known
    granularity: str = "stack"

    def validate(self) -> None:
        check_int("interval", self.interval, minimum=1, maximum=MAX_STEPS)
        check_int("order", self.order, minimum=1, maximum=MAX_ORDER)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)
        check_int("final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS)
        check_choice("granularity", self.granularity, GRANULARITIES)


def fixed_schedule(ctx: CallContext, interval: int, warmup: int, final_steps: int) -> bool:
    """TaylorSeer's counter: compute the ``warmup`` first steps, then every ``interval``-th step
    counted from the last warmup step, and the ``final_steps`` last ones when the step count is known."""
    if is_forced_step(ctx, warmup, final_steps):
        return True
    return (ctx.step - (warmup - 1)) % interval == 0


class TaylorSeerPolicy(Policy):
    name = "taylorseer"
    config_class = TaylorSeerConfig
    examples = {
        "tiny": {"order": 2},
        "tiny:block": {"order": 2, "granularity": "block"},
        "sequence_parallel": {"interval": 3},
    }

    def requirements(self) -> Requirements:
        return Requirements(indicator=None, reconstruction=TaylorReuse(
            order=self.config.order, granularity=self.config.granularity))

    def decide(self, state, ctx, indicator) -> bool:
        c = self.config
        return fixed_schedule(ctx, c.interval, c.warmup, c.final_steps)
