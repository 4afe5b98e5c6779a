"""``speca``: verify the prediction on the front block, accept it for the rest of the stack, or compute.

SpeCa-style verify-then-accept (speculative caching) on FoCa's predictor. Block 0 runs on every call
(``compute_first=1``; its residual is the ``front_residual`` indicator). The policy keeps the front
residuals of the last three *computed* steps and predicts the current one from them with the same
predictor-corrector weights (:func:`cachepass.reconstruction.foca_weights`, on the real timesteps) that
the reuse variant applies to the cached residual of blocks ``1..N-1``. The front block is the check: when

```
|r^ - r|_1 / |r|_1 < threshold        (r the front residual now, r^ its prediction)
```

the prediction of the remaining blocks is accepted (reuse), otherwise the call computes them. At most
``max_reuse`` consecutive calls accept; the ``warmup`` first steps and the ``final_steps`` last ones
(step count known) compute. No step count, calibration or per-model coefficient is needed: the threshold
is a relative prediction error, which means the same on every model.

Cost per call: the front block (``1/N`` of the stack), one weighted sum and one L1 pair on a
front-residual-sized tensor. Memory per branch: three residuals of blocks ``1..N-1`` (the cache) and
three front residuals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..reconstruction import CLOCKS, FoCaReuse, foca_weights
from .base import (
    MAX_STEPS,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
    check_choice,
    check_float,
    check_int,
    is_forced_step,
)
from .distance import l1_ratio, l1_sums

POINTS = 3


@dataclass(frozen=True)
class SpeCaConfig(PolicyConfig):
    threshold: float = 0.2
    max_reuse: int = 4
    warmup: int = 3
    final_steps: int = 1
    clock: str = "timestep"

    def validate(self) -> None:
        check_float("threshold", self.threshold, minimum=0.0)
        check_int("max_reuse", self.max_reuse, minimum=0, maximum=MAX_STEPS)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)
        check_int("final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS)
        check_choice("clock", self.clock, CLOCKS)


@dataclass
class SpeCaState:
    times: list = field(default_factory=list)  # of the stored front residuals, newest first
    fronts: list = field(default_factory=list)  # front residuals at the last computed steps
    run: int = 0  # consecutive accepted reuses
    errors: list = field(default_factory=list)  # (step, relative prediction error) per verified call


def predicted(weights, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j weights[j] tensors[j]`` in at least float32."""
    work = torch.promote_types(tensors[0].dtype, torch.float32)
    out: Any = None
    for w, t in zip(weights.tolist(), tensors):
        if w == 0.0:
            continue
        term = t.to(work) * w
        out = term if out is None else out.add_(term)
    return out if out is not None else torch.zeros_like(tensors[0], dtype=work)


class SpeCaPolicy(Policy):
    name = "speca"
    config_class = SpeCaConfig
    examples = {
        "tiny": {"threshold": 0.5, "warmup": 2},
        # the random sequence-parallel model's front residual is far from smooth: a loose check
        "sequence_parallel": {"threshold": 2.0, "warmup": 2},
    }

    @property
    def reads_timestep(self) -> bool:
        return self.config.clock == "timestep"

    def requirements(self) -> Requirements:
        return Requirements(indicator="front_residual", compute_first=1,
                            reconstruction=FoCaReuse(points=POINTS, clock=self.config.clock))

    def new_state(self) -> SpeCaState:
        return SpeCaState()

    def _time(self, ctx: CallContext) -> float:
        if self.config.clock == "timestep" and ctx.timestep is not None:
            return float(ctx.timestep)
        return float(ctx.step)

    def decide(self, state: SpeCaState, ctx: CallContext, indicator) -> bool:
        c = self.config
        now = self._time(ctx)
        forced = is_forced_step(ctx, c.warmup, c.final_steps)
        if not forced and len(state.fronts) >= 2 and state.run < c.max_reuse and now not in state.times:
            guess = predicted(foca_weights(state.times, now), state.fronts)
            error = l1_ratio(*ctx.sync.reduce(l1_sums(guess, indicator)).tolist())
            state.errors.append((ctx.step, error))
            if error < c.threshold:
                state.run += 1
                return False
        state.run = 0
        state.times.insert(0, now)
        state.fronts.insert(0, indicator.detach().clone())
        del state.times[POINTS:], state.fronts[POINTS:]
        return True
