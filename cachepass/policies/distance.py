"""The change measure the adaptive policies share: relative L1 distance between two tensors.

Computed from two sums, not two means, so that a sequence-parallel model can add each rank's sums
before dividing (:mod:`cachepass.runtime.distributed`): the ratio of the global sums is the relative L1 of the
whole sequence. On one process it equals ``mean|now - before| / mean|before|``.
"""

from __future__ import annotations

import torch

from ..runtime.distributed import LOCAL, DecisionSync


def l1_sums(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``[sum|now - before|, sum|before|]`` as one tensor on the inputs' device.

    In float32 at least, so half-precision tensors do not round the distance (and the sums stay
    summable across ranks without overflow).
    """
    work = torch.promote_types(now.dtype, torch.float32)
    before = before.to(work)
    return torch.stack([(now.to(work) - before).abs().sum(), before.abs().sum()])


def l1_ratio(num: float, den: float) -> float:
    """``num / den``; a zero reference gives 0 when nothing changed and ``inf`` otherwise, so the
    caller recomputes."""
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def relative_l1(now: torch.Tensor, before: torch.Tensor, sync: DecisionSync = LOCAL) -> float:
    """``|now - before|_1 / |before|_1`` as a host float (one device sync), over every rank of ``sync``."""
    num, den = sync.reduce(l1_sums(now, before)).tolist()
    return l1_ratio(num, den)
