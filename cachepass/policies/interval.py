"""``interval``: compute every N-th step of each branch and reuse the last residual in between.

The simplest schedule that exercises both compiled variants; also a baseline that adaptive policies
must beat. Steps ``0, N, 2N, ...`` are computed. With ``compute_last=True`` the last step is computed
too (the default) when the number of steps is known: from the ``num_steps`` option or from the pipeline
(``cache_context``'s step count, e.g. WanPipeline), from the first generation on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MAX_STEPS, Policy, PolicyConfig, Requirements, check_bool, check_int


@dataclass(frozen=True)
class IntervalConfig(PolicyConfig):
    interval: int = 3
    compute_last: bool = True  # the last step, when the step count is known

    def validate(self) -> None:
        check_int("interval", self.interval, minimum=1, maximum=MAX_STEPS)
        check_bool("compute_last", self.compute_last)


class IntervalPolicy(Policy):
    name = "interval"
    config_class = IntervalConfig
    examples = {"tiny": {"interval": 3}}

    def requirements(self) -> Requirements:
        return Requirements(indicator=None)

    def decide(self, state, ctx, indicator) -> bool:
        if self.config.compute_last and ctx.is_last_step:
            return True
        return ctx.step % self.config.interval == 0
