"""Per-instance runtime state: placement, the branches' caches, counters and stats.

State belongs to the module instance that is called (:mod:`cachepass.runtime.identity`), not to the
compiled program, which Dynamo shares between instances of a class. A registry maps the instance
(weakly) to its :class:`ModelRuntime`; the runtime holds no reference to any program, only weak ones,
so a program dropped by ``torch._dynamo.reset()`` and a freed model take their caches with them.

A branch's cache is served only to the same branch of the same request, from the same program, at the
same input signature (shapes, dtypes, devices of every caller tensor); anything else starts the branch
afresh, which computes.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._deprecation import renamed_attribute, renamed_module_attributes
from .._dynamo import unwrap
from ..reconstruction import ReuseCache
from .joint_decisions import StepLeader
from .placement import Placement, Placer

#: previous requests kept in ``stats().history``
HISTORY = 8


@dataclass
class BranchState:
    """One branch (a CFG call sequence: cond, uncond) of the current request: the policy's state and the
    cache it reads."""

    name: Any  # the placement's branch: the pipeline's name, or the call's rank within its step
    index: int  # the branch's rank in the request, in order of first appearance
    policy_state: Any
    cache: ReuseCache
    program: Any  # weak reference to the CachedProgram whose compute variant wrote the cache
    signature: tuple
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)

    def serves(self, program, signature: tuple) -> bool:
        """Whether ``program`` may read this cache: it was written at this signature by ``program`` or by
        a program of the same layout (the same options, blocks and residual stream: Dynamo's shape-generic
        recompile of the same graph)."""
        writer = self.program()
        if writer is None or self.signature != signature:
            return False
        return writer is program or writer.layout == program.layout


@dataclass
class BranchStats:
    """One branch (cond, uncond) of one generation: which steps ran the blocks and which reused the cache."""

    index: int  # the branch's rank in the generation, in order of first appearance
    computed_steps: list[int]
    reused_steps: list[int]
    cache_bytes: int
    name: Any = None  # the pipeline's name ("cond", "uncond") or the call's rank within its step

    @property
    def steps(self) -> int:
        return len(self.computed_steps) + len(self.reused_steps)

    stream = renamed_attribute("index", "BranchStats.stream", "BranchStats.index")
    branch = renamed_attribute("name", "BranchStats.branch", "BranchStats.name")


@dataclass
class Stats:
    """What ``cachepass.stats(model)`` returns."""

    policy: str | None
    caching: bool
    fallback_reason: str | None
    generations: int
    branches: list[BranchStats]  # of the current (or last) generation
    history: list[list[BranchStats]]  # previous generations, oldest first (at most HISTORY)
    calls: int
    computed_calls: int
    uncached_calls: int = 0  # calls that ran the unchanged graph (fallback), with uncached_reason
    uncached_reason: str | None = None

    @property
    def reused_calls(self) -> int:
        return self.calls - self.computed_calls

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache_bytes for s in self.branches)

    streams = renamed_attribute("branches", "Stats.streams", "Stats.branches")

    def __str__(self) -> str:
        if not self.caching and not self.calls:
            return f"cachepass: caching off ({self.fallback_reason or 'no call yet'})"
        lines = [f"cachepass [{self.policy}]: {self.generations} generation(s), "
                 f"{self.computed_calls}/{self.calls} calls computed the blocks"]
        if not self.caching:
            lines.append(f"  the last call ran uncached: {self.fallback_reason}")
        if self.uncached_calls:
            lines.append(f"  {self.uncached_calls} call(s) ran uncached: {self.uncached_reason}")
        for s in self.branches:
            name = f" ({s.name})" if isinstance(s.name, str) else ""
            lines.append(f"  branch {s.index}{name}: computed {len(s.computed_steps)}/{s.steps} steps "
                         f"{s.computed_steps}, cache {s.cache_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


class ModelRuntime:
    """Everything cachepass keeps for one module instance. ``lock`` serialises its calls."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.placer = Placer()
        self.steps = StepLeader()  # the first branch's decision, for the branches that follow it
        self.branches: dict[Any, BranchState] = {}
        self.history: deque[list[BranchStats]] = deque(maxlen=HISTORY + 1)  # + the last, between requests
        self.counters: dict[Any, list[int]] = {}  # per compile settings: [calls, computed calls]
        self.settings_key: Any = None  # of the last caching call
        self.policy_name: str | None = None
        self.caching = False  # whether the last call ran a caching program
        self.uncached_calls = 0
        self.uncached_reason: str | None = None
        self.fallback_reasons: list[str] = []  # compile-time reasons, distinct, oldest first
        self.watching_request_end = False
        self.doubts: set[str] = set()  # causes of uncertain placements already logged (once each)
        self._programs: set[int] = set()  # ids of the live programs this instance's caches came from
        #: what must run before the branches' step records are read: the decisions a device program kept on
        #: the device (``runtime/device_program.py``), read back at most once per request
        self.deferred: list = []

    # --- placement and branches ----------------------------------------------------------------

    def place(self, signal, t, num_steps) -> Placement:
        placement = self.placer.place(signal, t, num_steps)
        if placement.new_request:
            self._archive()
        return placement

    def settle(self) -> None:
        """Run what :attr:`deferred` holds, so the step records and counters are complete."""
        deferred, self.deferred = self.deferred, []
        for resolve in deferred:
            resolve()

    def _archive(self) -> None:
        self.settle()
        if self.branches:
            self.history.append(self.branch_stats())
        self.branches = {}

    def branch(self, placement: Placement, program, signature: tuple, make, certain: bool) -> BranchState:
        """The branch's state, or a fresh one (``make()`` -> (policy state, cache)) when the cache would
        belong to another program or signature, or the placement is not ``certain``."""
        state = self.branches.get(placement.branch)
        if state is not None and certain and state.serves(program, signature):
            return state
        self._follow(program)
        policy_state, cache = make()
        fresh = BranchState(placement.branch, placement.branch_index, policy_state, cache, weakref.ref(program),
                            signature)
        if state is not None:  # the same branch of the same request: its step record goes on
            fresh.computed, fresh.reused = state.computed, state.reused
        self.branches[placement.branch] = fresh
        return fresh

    def _follow(self, program) -> None:
        """When ``program`` is freed (``torch._dynamo.reset()``), drop the caches it wrote at once."""
        key = id(program)
        if key not in self._programs:
            self._programs.add(key)
            weakref.finalize(program, _drop_caches_of_freed_programs, weakref.ref(self), key)

    def end_request(self) -> None:
        """The pipeline call ended (``_reset_stateful_cache``) or ``cachepass.reset``: drop the caches."""
        with self.lock:
            self.placer.end_request()
            self._archive()

    reset = end_request

    # --- counting --------------------------------------------------------------------------------

    def count(self, settings_key, policy_name: str, computed: bool) -> None:
        counters = self.counters.setdefault(settings_key, [0, 0])
        counters[0] += 1
        counters[1] += int(computed)
        self.settings_key, self.policy_name, self.caching = settings_key, policy_name, True

    def count_uncached(self, reason: str) -> None:
        self.uncached_calls += 1
        self.uncached_reason = reason
        self.caching = False
        if reason not in self.fallback_reasons:
            self.fallback_reasons.append(reason)

    # --- stats -----------------------------------------------------------------------------------

    def branch_stats(self) -> list[BranchStats]:
        return [
            BranchStats(s.index, list(s.computed), list(s.reused), s.cache.nbytes(), s.name)
            for s in sorted(self.branches.values(), key=lambda s: s.index)
        ]

    def stats(self) -> Stats:
        with self.lock:
            self.settle()
        if self.settings_key is None:
            reason = self.uncached_reason or (self.fallback_reasons[-1] if self.fallback_reasons else None)
            return Stats(None, False, reason, 0, [], [], 0, 0, self.uncached_calls, self.uncached_reason)
        calls, computed = self.counters[self.settings_key]
        history = list(self.history)
        # between requests (a pipeline call ended and freed its caches) the last one is the current
        branches = self.branch_stats() if self.branches or not history else history.pop()
        history = history[-HISTORY:]
        return Stats(
            policy=self.policy_name,
            caching=self.caching,
            fallback_reason=None if self.caching else self.uncached_reason,
            generations=self.placer.request + 1,
            branches=branches,
            history=history,
            calls=calls,
            computed_calls=computed,
            uncached_calls=self.uncached_calls,
            uncached_reason=self.uncached_reason,
        )


def _drop_caches_of_freed_programs(runtime_ref, key: int) -> None:
    runtime = runtime_ref()
    if runtime is None:
        return
    runtime._programs.discard(key)
    # no lock: a finaliser may run inside a call; rebinding the dict is atomic
    runtime.branches = {k: b for k, b in list(runtime.branches.items()) if b.program() is not None}


_RUNTIMES: "weakref.WeakKeyDictionary[torch.nn.Module, ModelRuntime]" = weakref.WeakKeyDictionary()
_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # instances whose module was not found
_REGISTRY_LOCK = threading.Lock()


def _key(model) -> Any:
    return unwrap(model)  # torch.compile's OptimizedModule wraps the module


def runtime_for(model, create: bool = True) -> ModelRuntime | None:
    """The runtime of ``model`` (the compiled wrapper, the module, or an identity parameter)."""
    key = _key(model)
    table = _BY_PARAMETER if isinstance(key, torch.Tensor) else _RUNTIMES
    runtime = table.get(key)
    if runtime is None and isinstance(key, torch.nn.Module) and _BY_PARAMETER:
        for p in key.parameters():  # an instance first seen without its module (rare)
            runtime = _BY_PARAMETER.get(p)
            if runtime is not None:
                break
    if runtime is None and create:
        with _REGISTRY_LOCK:
            runtime = table.get(key)
            if runtime is None:
                runtime = table[key] = ModelRuntime()
    return runtime


#: ``StreamStats`` (deprecated): :class:`BranchStats`
__getattr__ = renamed_module_attributes(__name__, {"StreamStats": "BranchStats"})
