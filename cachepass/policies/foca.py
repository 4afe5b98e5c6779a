"""``foca``: compute on a fixed schedule, predict the skipped steps with FoCa's predictor-corrector.

FoCa (arXiv 2508.16211) treats the cached features as an ODE in the sampling time: a skipped call's
stack residual is forecast from the last three computed ones with a BDF2 slope and calibrated with a
Heun-type corrector, on the real timesteps (:mod:`cachepass.reconstruction.foca`). The schedule: the
``warmup`` first steps, then every ``interval``-th step, and the ``final_steps`` last ones when the step
count is known (the pipeline's, or the ``num_steps`` option).

With ``align="end"`` and the step count known the schedule is counted back from the last step (the last
step is computed, so is every ``interval``-th one before it, and the warmup): the same number of
computed steps as a schedule that forces the last one costs at most one more.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reconstruction import CLOCKS, FoCaReuse
from .base import (
    MAX_STEPS,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
    check_bool,
    check_choice,
    check_int,
    is_forced_step,
)

ALIGNS = ("start", "end")
SPACINGS = ("step", "timestep")


@dataclass(frozen=True)
class FoCaConfig(PolicyConfig):
    interval: int = 5
    warmup: int = 1
    final_steps: int = 1
    align: str = "start"
    clock: str = "timestep"
    corrector: bool = True
    points: int = 2  # measured best on both embedded models; 3: BDF2 slope + Heun corrector
    spacing: str = "step"

    def validate(self) -> None:
        check_choice("spacing", self.spacing, SPACINGS)
        check_int("points", self.points, minimum=1, maximum=3)
        check_int("interval", self.interval, minimum=1, maximum=MAX_STEPS)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)
        check_int("final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS)
        check_choice("align", self.align, ALIGNS)
        check_choice("clock", self.clock, CLOCKS)
        check_bool("corrector", self.corrector)


def aligned_schedule(ctx: CallContext, interval: int, warmup: int, final_steps: int, align: str) -> bool:
    """Compute the ``warmup`` first steps, the ``final_steps`` last ones (step count known) and every
    ``interval``-th step: counted from the last warmup step (``align="start"``, or the step count unknown)
    or back from the last step (``align="end"``)."""
    if is_forced_step(ctx, warmup, final_steps):
        return True
    if align == "end" and ctx.num_steps is not None:
        return (ctx.num_steps - 1 - ctx.step) % interval == 0
    return (ctx.step - (warmup - 1)) % interval == 0


class FoCaPolicy(Policy):
    name = "foca"
    config_class = FoCaConfig
    examples = {
        "tiny": {"interval": 3},
        "tiny:step-clock": {"interval": 3, "clock": "step", "align": "start"},
        "sequence_parallel": {"interval": 3},
    }

    @property
    def reads_timestep(self) -> bool:  # the timestep clock reads every call's timestep
        return self.config.clock == "timestep"

    def requirements(self) -> Requirements:
        c = self.config
        return Requirements(indicator=None, reconstruction=FoCaReuse(points=c.points, clock=c.clock, corrector=c.corrector))

    def new_state(self) -> dict:
        return {}

    def decide(self, state, ctx, indicator) -> bool:
        c = self.config
        if c.spacing == "timestep" and ctx.num_steps is not None and ctx.timestep is not None:
            state.setdefault("first", ctx.timestep)
            if is_forced_step(ctx, c.warmup, c.final_steps) or "last" not in state or (
                    abs(state["last"] - ctx.timestep) >= abs(state["first"]) * c.interval / ctx.num_steps * 0.999):
                state["last"] = ctx.timestep
                return True
            return False
        return aligned_schedule(ctx, c.interval, c.warmup, c.final_steps, c.align)
