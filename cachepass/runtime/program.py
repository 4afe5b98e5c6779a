"""The callable the backend hands to Dynamo: head, decision, then one compiled variant.

Per call: run the head graph; read the timestep to place the call (generation, step, stream); ask
the policy; run the compute variant and store its residuals, or feed the cache to the reuse variant.
The Python between the compiled pieces is the guard: it is outside any traced graph, so it adds no
graph break and no recompile, whatever the decisions are.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .._logging import get_logger
from ..policies.base import CallContext
from .state import ProgramState

log = get_logger(__name__)


def timestep_value(t) -> float | tuple | None:
    """A hashable host value for the timestep input (one sync for a device tensor)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            return None
        values = flat.float().cpu().tolist() if flat.numel() <= 64 else [float(flat[0])]
        return values[0] if len(set(values)) == 1 else tuple(values)
    return float(t)


class CachedProgram:
    def __init__(
        self,
        head: Callable,
        compute: Callable,
        reuse: Callable,
        *,
        state: ProgramState,
        has_indicator: bool,
        num_outputs: int,
        num_cache_writes: int,
        timestep_index: int | None,
    ) -> None:
        self.head = head
        self.compute = compute
        self.reuse = reuse
        self.state = state
        self.has_indicator = has_indicator
        self.num_outputs = num_outputs
        self.num_cache_writes = num_cache_writes
        self.timestep_index = timestep_index
        self.on_call: Callable[[ProgramState], None] | None = None

    def __call__(self, *args):
        state = self.state
        head_out = tuple(self.head(*args))
        indicator = head_out[0] if self.has_indicator else None
        exported = head_out[1:] if self.has_indicator else head_out

        t = timestep_value(args[self.timestep_index]) if self.timestep_index is not None else None
        pos = state.tracker.observe(t)
        if pos.new_generation:
            state.new_generation()
        stream = state.stream(pos.stream)
        ctx = CallContext(pos.generation, pos.step, pos.stream, state.tracker.num_steps,
                          t if not isinstance(t, tuple) else t[0], state.sync)
        compute = state.policy.decide(stream.policy_state, ctx, indicator) or not stream.cache.ready()
        if log.isEnabledFor(logging.DEBUG):  # before the variant runs: a rank stuck in it has logged
            log.debug("cachepass: generation %d step %d stream %d: %s", pos.generation, pos.step, pos.stream,
                      "compute" if compute else "reuse")
        state.calls += 1
        if self.on_call is not None:
            self.on_call(state)
        if compute:
            out = self.compute(*args, *exported)
            n, r = self.num_outputs, self.num_cache_writes
            stream.cache.write(out[n:n + r], pos.step)
            if len(out) > n + r:
                state.policy.after_compute(stream.policy_state, ctx, list(out[n + r:]))
            stream.computed.append(pos.step)
            state.computed_calls += 1
            return tuple(out[: self.num_outputs])
        stream.reused.append(pos.step)
        return tuple(self.reuse(*args, *exported, *stream.cache.read(pos.step)))
