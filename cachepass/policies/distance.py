"""The change measure the adaptive policies share: relative L1 distance between two tensors."""

from __future__ import annotations

import torch


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """``mean|now - before| / mean|before|`` as a host float (one device sync).

    Computed in float32 at least, so half-precision features do not round the distance. A zero
    reference gives 0 when nothing changed and ``inf`` otherwise, so the caller recomputes.
    """
    work = torch.promote_types(now.dtype, torch.float32)
    before = before.to(work)
    num, den = torch.stack([(now.to(work) - before).abs().mean(), before.abs().mean()]).tolist()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
