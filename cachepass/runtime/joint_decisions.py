"""Branches that decide together: in each step the first CFG branch decides, the later ones follow.

With classifier-free guidance as two calls per step, the output is ``uncond + s * (cond - uncond)``.
When the two branches compute on the same steps, the errors of their reused steps are alike and cancel
in the difference; when an indicator policy lets them decide apart (the unconditional branch's
indicator moves less, so it reuses longer), the guidance scale multiplies the mismatch. Measured on the
FLUX digits model at 28 steps, true CFG 4, digits 3 and 8: teacache threshold 0.2 computed 8 / 5 steps at
20.6 dB apart, 8 / 8 at 30.4 dB together; customcache threshold 0.4, 6 / 4 at 14.5 dB apart, 6 / 6 at
31.4 dB together (docs/policies.md).
A pipeline that batches CFG into one call decides once for both anyway.

Only the policy's decision is shared, never data: a follower computes or reuses from its own cache, and
still computes whenever its own cache is not ready or its placement is uncertain. The leader's such
fallbacks are not passed on, nor is the decision of a leader whose placement was uncertain (it
restarted its branch): followers then decide alone. A follower at a step its
leader has not decided (the first branch did not run this step) decides alone.
"""

from __future__ import annotations

from .placement import Placement


class StepLeader:
    """The latest decision of one module instance's first branch, by request and step."""

    def __init__(self) -> None:
        self._decided: tuple[int, int, bool] | None = None

    def lead(self, placement: Placement, compute: bool) -> None:
        """Record the first branch's policy decision at its step (later branches of the step follow it);
        its own fallbacks (an uncertain placement, a cache not ready) stay its own."""
        if placement.branch_index == 0:
            self._decided = (placement.request, placement.step, bool(compute))

    def follow(self, placement: Placement, own: bool) -> bool:
        """A later branch's decision: its leader's at the same request and step, else its own."""
        decided = self._decided
        if placement.branch_index == 0 or decided is None or decided[:2] != (placement.request, placement.step):
            return own
        return decided[2]
