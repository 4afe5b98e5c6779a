"""Choosing a threshold by replaying a policy's own decision rule on recorded trajectories.

No extra generation is needed: the policy object that will run (``TeaCachePolicy``, ``MagCachePolicy``,
made by its ``Calibration.search``) is asked to decide, step by step, on the recorded data. TeaCache's indicator is fed as a one-element
tensor whose relative change from step to step equals the recorded one, so ``decide`` computes exactly
the change it would see at run time (for ``timestep_embedding``, which does not depend on content, the
replayed schedule is the run-time schedule). A reused step ``t`` after the last computed step ``t0``
is charged the recorded error ``Trajectory.reuse_error(t0, t)``.

The computed-step count is non-increasing in the threshold for these rules (larger thresholds only
lengthen each skip span), so budgets are met by bisection.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .._deprecation import renamed_attribute, warn_renamed
from .._logging import get_logger
from ..errors import OptionError
from ..policies.base import CallContext, Policy
from .record import Recording, Trajectory

log = get_logger(__name__)

BISECTIONS = 60


@dataclass(frozen=True)
class Replay:
    """One threshold replayed: the computed steps of every recorded trajectory and the predicted error.
    (``streams`` and ``computed_per_stream``, deprecated: ``branch_indices``, ``computed_per_branch``.)"""

    threshold: float
    computed: list[list[int]]  # per trajectory (recording order), the computed steps
    errors: list[float]  # per trajectory: mean over its calls of the stack-output reuse error
    branch_indices: list[int]  # per trajectory, its branch's index (Trajectory.branch_index)

    @property
    def max_computed(self) -> int:
        return max(len(c) for c in self.computed)

    @property
    def error(self) -> float:
        return sum(self.errors) / len(self.errors)

    def computed_per_branch(self) -> list[int]:
        """Per branch, the most computed steps over the recorded generations."""
        out: dict[int, int] = {}
        for branch, steps in zip(self.branch_indices, self.computed):
            out[branch] = max(out.get(branch, 0), len(steps))
        return [out[b] for b in sorted(out)]

    streams = renamed_attribute("branch_indices", "Replay.streams", "Replay.branch_indices")

    def computed_per_stream(self) -> list[int]:
        """Deprecated: :meth:`computed_per_branch`."""
        warn_renamed("Replay.computed_per_stream()", "Replay.computed_per_branch()")
        return self.computed_per_branch()


def replay_trajectory(policy: Policy, traj: Trajectory, indicator: str | None) -> list[int]:
    """The steps ``policy`` computes on ``traj``, as the runtime would call it (a call with an empty
    cache computes whatever the policy says)."""
    state = policy.new_state()
    value = torch.ones(1, dtype=torch.float64)
    computed: list[int] = []
    for step in range(traj.num_steps):
        if indicator is not None and step > 0:
            value = value * (1.0 + traj.indicator_change[indicator][step])
        ctx = CallContext(traj.generation, step, traj.branch_index, traj.num_steps, traj.timesteps[step])
        if policy.decide(state, ctx, value if indicator is not None else None) or not computed:
            computed.append(step)
    return computed


def follow_first_branch(trajs: list[Trajectory], computed: list[list[int]]) -> list[list[int]]:
    """The computed steps as the runtime takes them with ``branches="together"`` (the default,
    :mod:`cachepass.runtime.joint_decisions`): a later branch computes where its generation's first branch
    did, and decides alone at steps the first branch did not reach; its first call always computes."""
    lead = {t.generation: (t.num_steps, set(c)) for t, c in zip(trajs, computed) if t.branch_index == 0}
    out = []
    for traj, own in zip(trajs, computed):
        first = lead.get(traj.generation)
        if traj.branch_index == 0 or first is None:
            out.append(own)
            continue
        reach, steps = first
        followed = {s for s in steps if s < min(reach, traj.num_steps)}
        out.append(sorted(followed | {s for s in own if s >= reach} | {0}))
    return out


def predicted_error(traj: Trajectory, computed: list[int]) -> float:
    """Mean over the trajectory's calls of the stack-output error reuse makes (0 on computed calls)."""
    total, last, computed_set = 0.0, 0, set(computed)
    for step in range(traj.num_steps):
        if step in computed_set:
            last = step
        else:
            total += traj.reuse_error(last, step)
    return total / traj.num_steps


class ThresholdSearch:
    """Replays of one policy family (``make(threshold) -> Policy``) on one recording."""

    def __init__(self, make: Callable[[float], Policy], recording: Recording, indicator: str | None) -> None:
        self.make, self.recording, self.indicator = make, recording, indicator
        self._cache: dict[float, Replay] = {}

    def replay(self, threshold: float) -> Replay:
        # policies take finite thresholds only; the largest float is "no limit" for any finite statistic
        threshold = min(threshold, sys.float_info.max)
        if threshold not in self._cache:
            policy = self.make(threshold)
            trajs = self.recording.trajectories
            computed = follow_first_branch(trajs, [replay_trajectory(policy, t, self.indicator) for t in trajs])
            errors = [predicted_error(t, c) for t, c in zip(trajs, computed)]
            self._cache[threshold] = Replay(threshold, computed, errors, [t.branch_index for t in trajs])
        return self._cache[threshold]

    def count(self, threshold: float) -> int:
        return self.replay(threshold).max_computed

    def _ceiling(self) -> float:
        """A finite threshold that already gives the fewest computed steps any threshold gives."""
        floor, high = self.count(math.inf), 1.0
        for _ in range(200):
            if self.count(high) <= floor:
                return high
            high *= 2.0
        return high

    def _bisect(self, ok: Callable[[float], bool], high: float) -> tuple[float, float]:
        """``(lo, hi)`` around the boundary of a predicate true for large thresholds and false for small."""
        lo = 0.0
        if ok(lo):
            return lo, lo
        for _ in range(BISECTIONS):
            mid = (lo + high) / 2
            lo, high = (lo, mid) if ok(mid) else (mid, high)
        return lo, high

    def smallest_with_at_most(self, steps: int, ceiling: float) -> float:
        return self._bisect(lambda thr: self.count(thr) <= steps, ceiling)[1]

    def for_steps(self, steps: int) -> Replay:
        """The threshold whose replay computes at most ``steps`` steps in every branch, exactly ``steps``
        when some threshold gives that; placed mid-way in the range of thresholds giving the same count."""
        ceiling = self._ceiling()
        fewest, most = self.count(ceiling), self.recording.num_steps
        if steps < fewest:
            log.warning("calibration: no threshold computes fewer than %d steps per branch with this policy's "
                        "forced steps; asked for %d", fewest, steps)
            steps = fewest
        if steps >= most:
            return self.replay(0.0)
        low = self.smallest_with_at_most(steps, ceiling)
        got = self.count(low)
        if got == steps:
            high = self.smallest_with_at_most(steps - 1, ceiling) if steps > fewest else ceiling * 2
            mid = (low + high) / 2
            return self.replay(mid if self.count(mid) == steps else low)
        log.warning("calibration: no threshold computes exactly %d steps per branch on the recording; the "
                    "nearest below computes %d", steps, got)
        return self.replay(low)

    def for_error(self, max_error: float) -> Replay:
        """The largest threshold whose replay's predicted error stays within ``max_error``."""
        ceiling = self._ceiling()
        if self.replay(ceiling).error <= max_error:
            return self.replay(ceiling)
        lo, _ = self._bisect(lambda thr: self.replay(thr).error > max_error, ceiling)
        if self.replay(lo).error > max_error:
            raise OptionError(f"no threshold keeps the predicted error within max_error={max_error}: even computing "
                              f"every step the policy predicts {self.replay(lo).error:.4g}")
        start = self.smallest_with_at_most(self.count(lo), ceiling)
        mid = (start + lo) / 2
        return self.replay(mid if self.count(mid) == self.count(lo) and self.replay(mid).error <= max_error else lo)
