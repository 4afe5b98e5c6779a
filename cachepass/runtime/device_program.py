"""The program of option ``decisions="device"``: the cache decision taken on the device, in one compiled
step graph (:mod:`cachepass.transform.device_variant`), its statistic never read back per call.

Per call, under the instance's lock, as :class:`~cachepass.runtime.program.CachedProgram`: head, placement,
branch. Then:

* a **forced** call (the rule's first or last steps, from the host-known step and step count) or one whose
  branch has no cache yet (a fresh branch, an uncertain placement) runs the compute variant: its cache
  writes become the branch's cache tensors, the indicator its reference, the accumulator 0;
* any other call runs the step graph with the branch's device state; it decides, runs one variant, updates
  the cache tensors and the reference in place or returns them, and returns the decision as a device bool.

Nothing the host path reads per call is read here: the decision's statistic, the accumulator and the
reference stay on the device. The decisions are recorded as device tensors and read back together, once,
when ``cachepass.stats`` is asked or the request ends (:meth:`ModelRuntime.settle`): until then a
branch's ``computed`` / ``reused`` steps and the computed-call counter lack the step graph's calls.
``torch.cond`` itself reads its predicate to choose the branch (one read per non-forced call in torch 2.13,
except under CUDA graph capture: see :mod:`cachepass.transform.device_variant`).

Unsupported, so the host path runs (said once): a policy without a device rule, another reconstruction,
sequence-parallel ranks (``sync`` over more than one rank: the statistic would need an in-graph all-reduce).
The policy's inspection lists (``TeaCacheState.distances``) are not kept on this path.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from .._logging import get_logger, warn_once
from ..policies.base import CallContext
from ..reconstruction.base import ReuseCache
from ..transform.compile import compile_piece
from ..transform.device_variant import DeviceRule, build_device_step, unsupported_reason
from .program import CachedProgram, call_signature, timestep_key
from .state import ModelRuntime

log = get_logger(__name__)


class DeviceCache(ReuseCache):
    """One branch's device state: the cache tensors (written in place by the step graph's compute branch),
    the reference indicator and the accumulator."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] | None = None
        self.reference: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None

    def write(self, residuals, step):
        self.tensors = list(residuals)

    def read(self, step):
        if self.tensors is None:
            raise RuntimeError("cachepass: reuse before any compute: the runtime must compute first")
        return self.tensors

    def ready(self):
        return self.tensors is not None

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors or ())


class DecisionLog:
    """One runtime's decisions not read back yet: ``(branch, step, computed, settings key)``, ``computed`` a
    bool (forced calls) or a 0-d device bool (the step graph's). Called by :meth:`ModelRuntime.settle`: one
    read per device for all of them, then the steps go to their branches and the computed calls to the
    counters."""

    def __init__(self, counters: dict) -> None:
        self.counters = counters
        self.entries: list[tuple[Any, int, Any, Any]] = []

    def add(self, branch, step: int, computed, key) -> None:
        self.entries.append((branch, step, computed, key))

    def __call__(self) -> None:
        entries, self.entries = self.entries, []
        by_device: dict[Any, list[torch.Tensor]] = defaultdict(list)
        for _, _, computed, _ in entries:
            if isinstance(computed, torch.Tensor):
                by_device[computed.device].append(computed)
        values = {device: iter(torch.stack(flags).tolist()) for device, flags in by_device.items()}
        for branch, step, computed, key in entries:
            if isinstance(computed, torch.Tensor):
                computed = bool(next(values[computed.device]))
                if computed:
                    self.counters.setdefault(key, [0, 0])[1] += 1
            (branch.computed if computed else branch.reused).append(step)


def _log_of(runtime: ModelRuntime) -> DecisionLog:
    for deferred in runtime.deferred:
        if isinstance(deferred, DecisionLog):
            return deferred
    decisions = DecisionLog(runtime.counters)
    runtime.deferred.append(decisions)
    return decisions


class DeviceProgram(CachedProgram):
    """The cached program with the decision on the device (module docstring). Built from the host
    program, whose pieces and settings it shares; it runs the host path itself where the device path does
    not apply."""

    def __init__(self, host: CachedProgram, step, step_layout, rule: DeviceRule) -> None:
        self.__dict__.update(vars(host))
        self.host = host
        self.step = step
        self.step_layout = step_layout
        self.rule = rule
        self.layout = ("device", host.layout)  # its caches hold device state, not the host path's

    def _new_branch(self):
        return None, DeviceCache()

    def _run(self, runtime: ModelRuntime, signal, args, loop_steps: int | None = None):
        if self.sync.world_size > 1:
            warn_once(log, ("device-decisions-sync", id(self.host)),
                      "cachepass: decisions='device' does not sum statistics over sequence-parallel ranks; "
                      "this program decides on the host")
            return self.host._run(runtime, signal, args, loop_steps)
        head_out = tuple(self.head(*args))
        indicator, exported = head_out[0], head_out[1:]

        t = timestep_key(args[self.timestep_index]) if self._reads_timestep(signal) else None
        placement = runtime.place(signal, t, loop_steps or self.num_steps)
        certain = placement.certain
        branch = runtime.branch(placement, self, call_signature(args, self.input_indices), self._new_branch,
                                certain)
        ctx = CallContext(placement.request, placement.step, placement.branch_index, placement.num_steps,
                          t if isinstance(t, float) else None, self.sync, placement.branch)
        if ctx.step == 0 and self.rule.check_steps is not None:
            self.rule.check_steps(ctx.num_steps)
        cache: DeviceCache = branch.cache
        decisions = _log_of(runtime)
        n = self.num_outputs
        if not certain or not cache.ready() or self.rule.forced(ctx):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("cachepass: generation %d step %d branch %d: compute (forced, decided on the host)",
                          placement.request, placement.step, placement.branch_index)
            runtime.count(self.settings_key, self.policy.name, True)
            out = self.compute(*args, *exported)
            cache.write(out[n:n + self.num_cache_writes], placement.step)
            cache.reference = indicator.detach().clone()
            if self.rule.accumulate:
                cache.accumulated = torch.zeros((), dtype=torch.float64, device=indicator.device)
            decisions.add(branch, placement.step, True, self.settings_key)
            return tuple(out[:n])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cachepass: generation %d step %d branch %d: decided on the device", placement.request,
                      placement.step, placement.branch_index)
        runtime.count(self.settings_key, self.policy.name, False)  # computed calls are added when read back
        state = [cache.accumulated] if self.rule.accumulate else []
        res = self.step(*args, *exported, indicator, *cache.tensors, cache.reference, *state)
        rest = list(res[n + 1:])
        if self.rule.returns_reference:
            cache.reference = rest.pop(0)
        if self.rule.accumulate:
            cache.accumulated = rest.pop(0)
        decisions.add(branch, placement.step, res[n], self.settings_key)
        return tuple(res[:n])


#: How the step graph branches: ``"cond"`` (``torch.cond``: one variant runs) or ``"select"`` (both run,
#: ``torch.where`` selects: no read back, no work skipped; for measurements and tests only).
BRANCH = "cond"


def device_program(host: CachedProgram, state, settings) -> CachedProgram:
    """The program for ``decisions="device"``: a :class:`DeviceProgram` when the policy states a device rule
    and the graph allows it, else ``host`` (one warning says why)."""
    rule = getattr(settings.policy, "device_rule", lambda: None)()
    reason = unsupported_reason(rule, state.requirements, state.variants)
    if reason is not None:
        warn_once(log, ("device-decisions", settings.policy_name, reason),
                  "cachepass: decisions='device' is not available for policy %r (%s); it decides on the host",
                  settings.policy_name, reason)
        return host
    step = build_device_step(state.variants, rule, state.example_inputs, BRANCH, eager=state.inner == "eager")
    compiled = compile_piece(step.gm, step.examples, state.inner, state.inductor_mode)
    state.pieces["device_step"] = compiled
    return DeviceProgram(host, compiled, step, rule)
