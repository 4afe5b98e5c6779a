"""Where a call sits: which request (generation), which step, which branch (CFG call sequence: cond, uncond).

Two sources, the pipeline's own signals first (:mod:`cachepass.runtime.signals`):

* **signalled** (diffusers pipelines): the branch is the ``cache_context`` name; the step is its
  ``step_index`` when given, else the branch's own call count (a pipeline calls each branch once per
  step, so a timestep that low-precision rounding repeats is still the next step); the
  step count is its ``num_inference_steps`` when given, else the pipeline's confirmed progress-bar total
  (:mod:`cachepass.runtime.signals`), else the ``num_steps`` option. A request ends at
  ``_reset_stateful_cache`` (the end of every pipeline call), when a branch comes back to a step it
  already passed (a restarted run), or when its timestep moves back or jumps (as below).
* **inferred** (raw loops): the timestep alone. The same timestep as the previous call is another branch
  of the same step; a timestep moving on along the trajectory is the next step; one moving back, or
  jumping more than ``JUMP`` times the previous gap (an img2img run starting lower after a cancelled
  one), starts a new request. Without a timestep input each call is a step; ``num_steps`` or
  ``cachepass.reset`` end requests. The step count is the pipeline's confirmed progress-bar total while
  its loop runs (a pipeline without ``cache_context``, StableDiffusion3Pipeline), else ``num_steps``.

A repeated timestep is ambiguous: another CFG branch, or a new request at the same timestep (a warm-up
call, then the generation). Until the branch count is established (a later step has as many calls as
the first, or a step with fewer calls shows the extras were earlier requests), calls after the first
step are placed *uncertain*: they compute and restart their branch, so no cache crosses requests.
A timestep whose elements differ (a batch at several steps) places nothing: uncertain, always.

Decisions never depend on earlier requests: nothing is learnt across them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .signals import PipelineSignal

#: a timestep input whose elements differ
MIXED = "mixed"
#: inferred branches per step before a repeated timestep counts as a new request (bounded memory)
MAX_INFERRED_BRANCHES = 4
#: a gap this many times the previous one is a new request, not the next step
JUMP = 4.0


@dataclass(frozen=True)
class Placement:
    request: int  # per instance, counted from 0
    step: int
    branch: Any  # the pipeline's branch name, or the call's rank within its step
    branch_index: int  # the branch's rank in the request, in order of first appearance
    num_steps: int | None
    certain: bool = True  # False: identity not established; compute and start the branch afresh
    new_request: bool = False  # the call starts a request
    doubt: str | None = None  # why the placement is not certain


MIXED_DOUBT = "the timestep's elements differ (a batch whose elements are at different steps)"
REPEAT_DOUBT = ("a repeated timestep in a loop without pipeline signals may be another CFG branch or a new "
                "request at the same timestep")


@dataclass
class _Branch:
    step: int
    t: Any


@dataclass
class _Request:
    branches: dict = field(default_factory=dict)  # branch -> _Branch (last placed call)
    order: list = field(default_factory=list)  # branches in order of first appearance
    timeline: dict = field(default_factory=dict)  # timestep -> step (signalled without step_index)
    # inferred placement
    step: int = -1
    branch: int = 0
    last_t: Any = None
    direction: int = 0
    gap: float = 0.0
    counts: list = field(default_factory=list)  # calls per step
    width: int = 1  # calls of the first step, or fewer once a later step showed fewer
    established: bool = False


class Placer:
    """Places the calls of one module instance (one placer per instance, shared by its graphs)."""

    def __init__(self) -> None:
        self.request = -1
        self._ended = True
        self._current = _Request()

    def end_request(self) -> None:
        """The pipeline call finished (or ``cachepass.reset``): the next call starts a new request."""
        self._ended = True

    def _start(self) -> None:
        self.request += 1
        self._ended = False
        self._current = _Request()

    def _branch_index(self, branch) -> int:
        order = self._current.order
        if branch not in order:
            order.append(branch)
        return order.index(branch)

    def place(self, signal: PipelineSignal | None, t, num_steps: int | None) -> Placement:
        """Place one call; ``t`` is the timestep as a float, :data:`MIXED`, or ``None`` (no timestep input)."""
        if signal is not None:
            return self._signalled(signal, t, num_steps)
        return self._inferred(t, num_steps)

    # --- the pipeline's signals ------------------------------------------------------------------

    def _signalled(self, signal: PipelineSignal, t, option_steps: int | None) -> Placement:
        num_steps = signal.num_steps or option_steps
        new = self._ended or self.request < 0
        req = self._current
        track = None if new else req.branches.get(signal.branch)
        if not new and track is not None:
            if signal.step_index is not None:
                new = signal.step_index <= track.step  # the branch went back: a restarted run
            elif _scalar(t) and _scalar(track.t) and t != track.t:
                new = _breaks(req, track.t, t)
        if new:
            self._start()
            req, track = self._current, None
        elif track is not None and _scalar(t) and _scalar(track.t) and t != track.t:
            _advance(req, track.t, t)
        if signal.step_index is not None:
            step = signal.step_index
        elif track is not None:  # a pipeline calls each branch once per step: its calls count its steps
            step = track.step + 1  # (a timestep repeated by low-precision rounding is still the next step)
        elif _scalar(t) and t in req.timeline:  # a branch first seen at a step another branch is at
            step = req.timeline[t]
        else:
            step = max((b.step for b in req.branches.values()), default=-1) + (1 if _scalar(t) else 0)
            step = max(step, 0)
        if num_steps is not None and step >= num_steps and not new and signal.step_index is None:
            self._start()  # ran past the step count: a new request
            req, new, step = self._current, True, 0
            if _scalar(t):
                req.timeline[t] = 0
        req.branches[signal.branch] = _Branch(step, t)
        if _scalar(t):
            req.timeline.setdefault(t, step)
        certain = signal.step_index is not None or t != MIXED
        return Placement(self.request, step, signal.branch, self._branch_index(signal.branch), num_steps,
                         certain, new, doubt=None if certain else MIXED_DOUBT)

    # --- the timesteps alone ---------------------------------------------------------------------

    def _inferred(self, t, num_steps: int | None) -> Placement:
        if t == MIXED:  # a batch at several steps: nothing can be placed
            new = self._ended or self.request < 0
            if new:
                self._start()
            return Placement(self.request, max(self._current.step, 0), MIXED, self._branch_index(MIXED), num_steps,
                             certain=False, new_request=new, doubt=MIXED_DOUBT)
        req = self._current
        new = self._ended or self.request < 0
        if not new:
            if t is None:
                new = num_steps is not None and req.step + 1 >= num_steps
            elif t == req.last_t:
                new = req.branch + 1 >= MAX_INFERRED_BRANCHES
            else:
                new = _breaks(req, req.last_t, t) or (num_steps is not None and req.step + 1 >= num_steps)
        if new:
            self._start()
            req = self._current
        if not new and t is not None and t == req.last_t:  # another branch of this step
            req.branch += 1
            req.counts[-1] += 1
        else:  # the next step
            if req.step >= 0:
                if t is not None and req.last_t is not None:
                    _advance(req, req.last_t, t)
                if req.counts[-1] < req.width:  # fewer calls than the first step: the extras were requests
                    req.width = req.counts[-1]
                    req.established = True
            req.step += 1
            req.branch = 0
            req.counts.append(1)
            if req.step == 0:
                req.width = 1
        req.last_t = t
        if req.step == 0:
            req.width = req.counts[0]
        elif req.counts[-1] == req.width:
            req.established = True  # a later step has as many calls as the first: the branches are real
        certain = req.step == 0 or req.width == 1 or req.established
        req.branches[req.branch] = _Branch(req.step, t)
        return Placement(self.request, req.step, req.branch, self._branch_index(req.branch), num_steps, certain, new,
                         doubt=None if certain else REPEAT_DOUBT)


def _scalar(t) -> bool:
    return t is not None and t != MIXED


def _breaks(req: _Request, previous: float, t: float) -> bool:
    """Whether going from ``previous`` to ``t`` leaves the request's trajectory: against its direction,
    or a gap more than ``JUMP`` times the last one."""
    if _moves_back(previous, t, req.direction):
        return True
    return req.gap > 0 and abs(t - previous) > JUMP * req.gap


def _advance(req: _Request, previous: float, t: float) -> None:
    req.direction = _sign(t, previous)
    req.gap = abs(t - previous)


def _sign(a: float, b: float) -> int:
    return (a > b) - (a < b)


def _moves_back(previous, t, direction: int) -> bool:
    """Whether ``t`` moves against a known direction of the trajectory."""
    return bool(direction) and previous is not None and _sign(t, previous) not in (0, direction)
