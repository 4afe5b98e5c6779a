"""Per-model runtime state: the programs compiled for it, each with its streams, and the stats.

State lives with the compiled model: a registry maps the user's ``nn.Module`` (weakly) to a
:class:`ModelRuntime`. Each Dynamo graph (one per input shape, say) gets its own
:class:`ProgramState`, so a cache is never read by a program of another shape.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from ..distributed import LOCAL, DecisionSync
from ..policies.base import Policy
from ..reconstruction import ReuseCache
from .tracker import StepTracker


@dataclass
class StreamState:
    policy_state: Any
    cache: ReuseCache
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)


@dataclass
class StreamStats:
    """One stream of one generation: which steps ran the blocks and which reused the cache."""

    stream: int
    computed_steps: list[int]
    reused_steps: list[int]
    cache_bytes: int

    @property
    def steps(self) -> int:
        return len(self.computed_steps) + len(self.reused_steps)


@dataclass
class Stats:
    """What ``cachepass.stats(model)`` returns."""

    policy: str | None
    caching: bool
    fallback_reason: str | None
    generations: int
    streams: list[StreamStats]  # of the current (or last) generation
    history: list[list[StreamStats]]  # previous generations, oldest first
    calls: int
    computed_calls: int

    @property
    def reused_calls(self) -> int:
        return self.calls - self.computed_calls

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache_bytes for s in self.streams)

    def __str__(self) -> str:
        if not self.caching:
            return f"cachepass: caching off ({self.fallback_reason or 'no call yet'})"
        lines = [f"cachepass [{self.policy}]: {self.generations} generation(s), "
                 f"{self.computed_calls}/{self.calls} calls computed the blocks"]
        for s in self.streams:
            lines.append(f"  stream {s.stream}: computed {len(s.computed_steps)}/{s.steps} steps "
                         f"{s.computed_steps}, cache {s.cache_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


class ProgramState:
    """Streams, step tracking and counters of one compiled program.

    ``sync`` makes the ranks of a sequence-parallel model take the same decisions (identity on one
    process); the caches in the streams stay local to the rank.
    """

    def __init__(self, policy: Policy, reconstruction, num_steps: int | None,
                 sync: DecisionSync = LOCAL) -> None:
        self.policy = policy
        self.reconstruction = reconstruction
        self.sync = sync
        self.tracker = StepTracker(num_steps)
        self.streams: dict[int, StreamState] = {}
        self.history: list[list[StreamStats]] = []
        self.calls = 0
        self.computed_calls = 0

    def stream(self, index: int) -> StreamState:
        state = self.streams.get(index)
        if state is None:
            state = StreamState(self.policy.new_state(), self.reconstruction.new_cache())
            self.streams[index] = state
        return state

    def new_generation(self) -> None:
        if self.streams:
            self.history.append(self.stream_stats())
        self.streams = {}

    def reset(self) -> None:
        self.tracker.reset()
        self.new_generation()

    def stream_stats(self) -> list[StreamStats]:
        return [
            StreamStats(i, list(s.computed), list(s.reused), s.cache.nbytes())
            for i, s in sorted(self.streams.items())
        ]


class ModelRuntime:
    """Everything cachepass keeps for one user model."""

    def __init__(self) -> None:
        self.programs: list[ProgramState] = []
        self.fallback_reasons: list[str] = []
        self.last_active: ProgramState | None = None

    def reset(self) -> None:
        for program in self.programs:
            program.reset()

    def stats(self) -> Stats:
        program = self.last_active or (self.programs[-1] if self.programs else None)
        if program is None:
            reason = self.fallback_reasons[-1] if self.fallback_reasons else None
            return Stats(None, False, reason, 0, [], [], 0, 0)
        return Stats(
            policy=program.policy.name,
            caching=True,
            fallback_reason=None,
            generations=program.tracker.generation + 1,
            streams=program.stream_stats(),
            history=list(program.history),
            calls=sum(p.calls for p in self._siblings(program)),
            computed_calls=sum(p.computed_calls for p in self._siblings(program)),
        )

    def _siblings(self, program: ProgramState) -> list[ProgramState]:
        """The programs compiled with the same policy and options as ``program`` (one per graph: input
        shapes, graph breaks); a recompile of the module with other options does not count."""
        same = (program.policy.name, program.policy.config)
        return [p for p in self.programs if (p.policy.name, p.policy.config) == same]


_RUNTIMES: "weakref.WeakKeyDictionary[Any, ModelRuntime]" = weakref.WeakKeyDictionary()


def _key(model) -> Any:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the module


def runtime_for(model, create: bool = True) -> ModelRuntime | None:
    key = _key(model)
    runtime = _RUNTIMES.get(key)
    if runtime is None and create:
        runtime = _RUNTIMES[key] = ModelRuntime()
    return runtime
