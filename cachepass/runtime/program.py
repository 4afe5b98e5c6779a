"""The callables the backend hands to Dynamo: the cached program (head, decision, one variant) and the
uncached one (the unchanged graph, counted).

Per call: find the instance that is called, and under its lock: run the head graph; place the call
(request, step, branch) from the pipeline's signals or the timestep; take the branch's state if it
was written by this program at this input signature, else start it afresh; ask the policy; run the
compute variant and store its cache writes, or feed the cache to the reuse variant. The Python between
the compiled pieces is outside any traced graph, so it adds no graph break and no recompile.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence

import torch

from .._logging import get_logger
from ..policies.base import CallContext
from . import signals
from .identity import InstanceIdentity, outer_owner
from .placement import MIXED
from .state import ModelRuntime, runtime_for

log = get_logger(__name__)


def timestep_key(t) -> float | str | None:
    """The call's timestep as one float, :data:`~cachepass.runtime.placement.MIXED` when its elements
    differ, or ``None`` (one host read for a device tensor)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            return None
        if flat.numel() <= 64:
            values = flat.tolist()
            return float(values[0]) if all(v == values[0] for v in values) else MIXED
        if not bool((flat == flat[0]).all()):
            return MIXED
        return float(flat[0])
    return float(t)


def call_signature(args: Sequence[Any], indices: Sequence[int]) -> tuple:
    """Shapes, dtypes and devices of the caller's inputs (and the values of size arguments): a cache
    written at one signature is never read at another."""
    out = []
    for i in indices:
        a = args[i]
        if isinstance(a, torch.Tensor):
            out.append((tuple(a.shape), a.dtype, a.device))
        elif isinstance(a, (int, float, bool)) or a is None:
            out.append(a)
        else:
            out.append(type(a))
    return tuple(out)


def _end_of_request(module) -> None:
    runtime = runtime_for(module, create=False)
    if runtime is not None:
        runtime.end_request()


def _watch(runtime: ModelRuntime, owner) -> None:
    if not runtime.watching_request_end:
        runtime.watching_request_end = True
        signals.watch_request_end(owner, _end_of_request)


class CachedProgram:
    def __init__(
        self,
        head: Callable,
        compute: Callable,
        reuse: Callable,
        *,
        policy,
        reconstruction,
        settings_key: Any,
        num_steps: int | None,
        sync,
        identity: InstanceIdentity,
        branches: str = "together",
        input_indices: Sequence[int],
        has_indicator: bool,
        num_outputs: int,
        num_cache_writes: int,
        timestep_index: int | None,
        reuses: bool = True,
        layout: Any = None,
    ) -> None:
        self.head = head
        self.compute = compute
        self.reuse = reuse
        self.policy = policy
        self.reconstruction = reconstruction
        self.settings_key = settings_key
        self.num_steps = num_steps
        self.sync = sync
        self.identity = identity
        self.branches_together = branches == "together"
        self.input_indices = tuple(input_indices)
        self.has_indicator = has_indicator
        self.num_outputs = num_outputs
        self.num_cache_writes = num_cache_writes
        self.timestep_index = timestep_index
        self.reuses = reuses
        self.layout = layout if layout is not None else id(self)  # what its cache writes mean

    def _reads_timestep(self, signal) -> bool:
        """Whether this call's timestep is read back to the host: not when the pipeline states the step
        and the policy does not read it (a device read waits for the queue to drain)."""
        if self.timestep_index is None:
            return False
        return signal is None or signal.step_index is None or self.policy.reads_timestep

    def _timestep(self, args, signal):
        """The call's timestep (:func:`timestep_key`), or ``None`` when it is not read."""
        return timestep_key(args[self.timestep_index]) if self._reads_timestep(signal) else None

    def _decided(self, branch, placement, ctx, compute: bool) -> None:
        """Told the decision of every call before its variant runs (a split stack's fragments follow it)."""

    def _new_branch(self):
        return self.policy.new_state(), self.reconstruction.new_cache()

    def __call__(self, *args):
        owner = self.identity.owner(args)
        if owner is None:  # no module state in the graph and no module known: the program is the instance
            owner = self
        runtime = runtime_for(owner)
        with runtime.lock:
            _watch(runtime, owner)
            return self._run(runtime, signals.current_signal(owner), args, signals.loop_steps(owner))

    def _run(self, runtime: ModelRuntime, signal, args, loop_steps: int | None = None):
        head_out = tuple(self.head(*args))
        indicator = head_out[0] if self.has_indicator else None
        exported = head_out[1:] if self.has_indicator else head_out

        t = self._timestep(args, signal)
        placement = runtime.place(signal, t, loop_steps or self.num_steps)  # the pipeline's count wins
        # a policy that never reuses (calibration's recorder) keeps its branch through uncertain calls
        certain = placement.certain or not self.reuses
        branch = runtime.branch(placement, self, call_signature(args, self.input_indices), self._new_branch,
                                certain)
        ctx = CallContext(placement.request, placement.step, placement.branch_index, placement.num_steps,
                          t if isinstance(t, float) else None, self.sync, placement.branch)
        compute = self.policy.decide(branch.policy_state, ctx, indicator)
        if self.branches_together:  # the policy's decision is shared, not a branch's own fallbacks below
            if placement.certain:  # an uncertain call restarted its branch: its decision is its own
                runtime.steps.lead(placement, compute)
            compute = runtime.steps.follow(placement, compute)
        branch.cache.note_time(placement.step, ctx.timestep)  # real-time predictions (reconstruction/foca.py)
        compute = compute or not certain or not branch.cache.ready()
        self._decided(branch, placement, ctx, compute)
        if not certain and placement.doubt not in runtime.doubts:
            runtime.doubts.add(placement.doubt)
            log.debug("cachepass: %s: such calls compute and start their branch afresh", placement.doubt)
        if log.isEnabledFor(logging.DEBUG):  # before the variant runs: a rank stuck in it has logged
            log.debug("cachepass: generation %d step %d branch %d%s%s: %s", placement.request, placement.step,
                      placement.branch_index, f" ({placement.branch})" if isinstance(placement.branch, str) else "",
                      "" if certain else " (branch not established: computes, starts afresh)",
                      "compute" if compute else "reuse")
        runtime.count(self.settings_key, self.policy.name, compute)
        if compute:
            out = self.compute(*args, *exported)
            n, r = self.num_outputs, self.num_cache_writes
            branch.cache.write(out[n:n + r], placement.step)
            if len(out) > n + r:
                self.policy.after_compute(branch.policy_state, ctx, self.policy.observed_by_name(out[n + r:]))
            branch.computed.append(placement.step)
            return tuple(out[:n])
        branch.reused.append(placement.step)
        return tuple(self.reuse(*args, *exported, *branch.cache.read(placement.step)))


class UncachedProgram:
    """The unchanged graph, compiled by ``inner``; its calls are counted as uncached, with the reason,
    unless the graph holds no blocks at all (a helper graph beside a cached one)."""

    def __init__(self, compiled: Callable, identity: InstanceIdentity, reason: str, counts: bool,
                 outer: bool = False) -> None:
        self.compiled = compiled
        self.identity = identity
        self.reason = reason
        self.counts = counts
        self.outer = outer  # a block of a split stack: count its calls on the model it belongs to

    def __call__(self, *args):
        if self.counts:
            owner = self.identity.owner(args)
            if self.outer and isinstance(owner, torch.nn.Module):
                owner = outer_owner(owner, sys._getframe(1))
            runtime = runtime_for(owner if owner is not None else self)
            with runtime.lock:
                runtime.count_uncached(self.reason)
        return self.compiled(*args)
