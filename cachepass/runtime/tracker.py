"""Infer generation, step and stream of each denoiser call from the timestep it receives.

No pipeline tells the denoiser where it is in the sampling loop, so the tracker reads the timestep:

* the same timestep as the previous call: another *stream* of the same step (a pipeline that calls
  the model for cond and then uncond); batched CFG is one call, hence one stream;
* a different timestep, moving in the direction of the trajectory so far: the next *step*;
* a timestep moving against that direction (back to the start of a schedule): a new *generation*.
  The direction is learnt from the first two steps, so schedules that count up (``1 - t``) work too.

Without a timestep input each call is a step of one stream, and only ``num_steps`` or an explicit
``cachepass.reset`` starts a new generation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    generation: int
    step: int
    stream: int
    new_generation: bool


class StepTracker:
    def __init__(self, num_steps: int | None = None) -> None:
        self.fixed_num_steps = num_steps
        self.learnt_num_steps: int | None = None
        self.generation = -1
        self._reset_generation_state()

    def _reset_generation_state(self) -> None:
        self.step = -1
        self.stream = 0
        self.first_t = None
        self.last_t = None
        self.direction = 0

    @property
    def num_steps(self) -> int | None:
        return self.fixed_num_steps or self.learnt_num_steps

    def reset(self) -> None:
        """Forget the current generation; the next call starts a new one."""
        if self.step >= 0:
            self.learnt_num_steps = self.step + 1
        self._reset_generation_state()

    def _start_generation(self) -> None:
        self.reset()
        self.generation += 1

    def observe(self, t) -> Position:
        """Place one call with timestep ``t`` (a float, a tuple of floats, or ``None``)."""
        new_gen = False
        if self.step < 0:
            new_gen = True
        elif t is None:
            if self.num_steps is not None and self.step + 1 >= self.num_steps:
                new_gen = True
        elif t == self.last_t:
            self.stream += 1
            return Position(self.generation, self.step, self.stream, False)
        else:
            direction = _sign(t, self.last_t)
            if self.direction and direction != self.direction:
                new_gen = True
            elif self.fixed_num_steps is not None and self.step + 1 >= self.fixed_num_steps:
                new_gen = True
            else:
                self.direction = direction
        if new_gen:
            self._start_generation()
            self.first_t = t
        self.step += 1
        self.stream = 0
        self.last_t = t
        return Position(self.generation, self.step, 0, new_gen)


def _sign(a, b) -> int:
    a0 = a[0] if isinstance(a, tuple) else a
    b0 = b[0] if isinstance(b, tuple) else b
    return (a0 > b0) - (a0 < b0)
