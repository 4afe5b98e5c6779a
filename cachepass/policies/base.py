"""The policy interface: what a policy declares at compile time and decides at run time.

A policy is split in two so that the compiler pass never needs to know the algorithm:

* at compile time it states its :class:`Requirements`: which indicator tensor the head graph must
  produce before the decision (none, the timestep embedding, the first block's modulated input or the
  first block's output) and how a skipped call is rebuilt (a :class:`~cachepass.reconstruction.Reconstruction`);
* at run time, per call, :meth:`Policy.decide` sees a :class:`CallContext` (generation, step, stream,
  number of steps when known) and the indicator tensor, and returns ``True`` to compute the block stack
  or ``False`` to reuse the cache. A policy keeps all its mutable data in the state object it created
  with :meth:`Policy.new_state`; the runtime keeps one such state per stream and makes a new one at
  every generation, so policies never reset themselves.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..distributed import LOCAL, DecisionSync
from ..errors import OptionError
from ..reconstruction import Reconstruction, ResidualReuse

#: Indicators the analysis can provide (see ``cachepass.analysis.indicators``).
#: ``front_residual``: the residual of the ``compute_first`` front blocks (output minus input), made by
#: the head graph (First-Block-Cache, DBCache).
INDICATORS = ("timestep_embedding", "modulated_input", "first_block_output", "front_residual")


@dataclass(frozen=True)
class Requirements:
    """What the compiled program must provide to a policy.

    * ``indicator``: computed by the head graph before every decision (see ``INDICATORS``).
    * ``compute_first`` / ``compute_last``: blocks computed on every call before / after the cached
      span (First-Block-Cache: 1/0; DBCache: Fn/Bn). The residual cached is the span's.
    * ``observe``: body tensors the compute variant also returns, handed to ``after_compute``
      (names from ``cachepass.analysis.features``, e.g. ``attention_output:middle``).
    * ``reconstruction``: how a reuse call rebuilds the span's outputs.
    """

    indicator: str | None = None
    reconstruction: Reconstruction = dataclasses.field(default_factory=ResidualReuse)
    compute_first: int = 0
    compute_last: int = 0
    observe: tuple[str, ...] = ()
    reuses: bool = True  # False (policy ``none``): no cache writes, no reuse variant compiled


@dataclass(frozen=True)
class CallContext:
    """Where one denoiser call sits in the sampling loop, as the step tracker inferred it.

    ``sync`` sums a decision's statistics over the ranks that must decide together (sequence
    parallelism; identity on one process): a policy stacks every sum one decision reads into one tensor
    and calls ``ctx.sync.reduce`` once (see :mod:`cachepass.distributed`).
    """

    generation: int
    step: int
    stream: int
    num_steps: int | None
    timestep: float | None
    sync: DecisionSync = LOCAL

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy's options. Subclasses add fields and check them in ``validate``."""

    def validate(self) -> None:  # pragma: no cover - trivial default
        """Raise :class:`OptionError` naming the option and what is allowed."""


class Policy(ABC):
    """A cache-reuse algorithm, independent of any model."""

    name: ClassVar[str]
    config_class: ClassVar[type[PolicyConfig]]

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @abstractmethod
    def requirements(self) -> Requirements:
        """Declared once, at compile time."""

    def new_state(self) -> Any:
        """Fresh per-stream state for a new generation."""
        return None

    @abstractmethod
    def decide(self, state: Any, ctx: CallContext, indicator: torch.Tensor | None) -> bool:
        """``True``: compute the blocks this call; ``False``: rebuild them from the cache."""

    def after_compute(self, state: Any, ctx: CallContext, observed: list[torch.Tensor]) -> None:
        """Called after each compute call with the tensors named in ``Requirements.observe``."""

    def check_model(self, model: torch.nn.Module) -> None:
        """Called at compile time with the user's module when it is known (a calibrated policy warns when
        its profile was made for another model)."""


# --- option checking helpers shared by every policy config -------------------------------------

def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"option {name!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(f"option {name!r} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise OptionError(f"option {name!r} must be <= {maximum}, got {value}")


def check_float(name: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"option {name!r} must be a number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise OptionError(f"option {name!r} must be {'>' if strict else '>='} {minimum}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise OptionError(f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"option {name!r} must be True or False, got {value!r}")


def check_optional_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if value is not None:
        check_int(name, value, minimum=minimum, maximum=maximum)


# --- schedule helpers --------------------------------------------------------------------------

def is_forced_step(ctx: CallContext, first: int, last: int = 0) -> bool:
    """Whether the call is one of the first ``first`` steps or, when ``ctx.num_steps`` is known, one of
    the last ``last`` steps. With the step count unknown (first generation without the ``num_steps``
    option) no last step can be recognised, so only the first steps are forced."""
    if ctx.step < first:
        return True
    return last > 0 and ctx.num_steps is not None and ctx.step >= ctx.num_steps - last
