"""Fits on a recording: TeaCache's rescale polynomial and MagCache's magnitude ratios.

TeaCache accumulates ``poly(d)`` over skipped steps, ``d`` the indicator's relative change, and
recomputes once the sum reaches the threshold. Fitting ``poly`` to the error that reusing the previous
step's residual makes in the stack output (``Trajectory.step_change``) turns the sum into an estimate of
the error reuse accumulates, so the threshold reads as a relative L1 error of the stack output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .record import Recording


@dataclass(frozen=True)
class PolyFit:
    """A least-squares polynomial (numpy.poly1d order) and how well it explains the data."""

    indicator: str
    coefficients: tuple[float, ...]
    r2: float  # 1 - SS_res / SS_tot
    relative_rms: float  # RMS of the residuals / RMS of the targets
    points: int

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def to_dict(self) -> dict:
        return {"indicator": self.indicator, "degree": self.degree, "r2": round(self.r2, 6),
                "relative_rms": round(self.relative_rms, 6), "points": self.points}


def fit_polynomial(x, y, degree: int = 4, indicator: str = "") -> PolyFit:
    """``np.polyfit`` of ``y`` on ``x`` with the fit's R^2 and relative RMS residual."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if degree < 0 or len(x) <= degree:
        raise OptionError(f"a degree-{degree} fit needs more than {degree} finite points, got {len(x)}; "
                          "record more steps or generations, or lower the degree")
    coeffs = np.polyfit(x, y, degree)
    residual = y - np.polyval(coeffs, x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    rms_y = math.sqrt(float((y ** 2).mean()))
    rel = math.sqrt(float((residual ** 2).mean())) / rms_y if rms_y > 0 else 0.0
    return PolyFit(indicator, tuple(float(c) for c in coeffs), r2, rel, len(x))


def fit_teacache(recording: Recording, indicator: str, degree: int = 4) -> PolyFit:
    """The rescale polynomial for ``indicator``: indicator change -> one-step reuse error, pooled over
    every recorded branch and generation (step 0 has no change and is left out)."""
    if indicator not in recording.indicators:
        raise OptionError(f"indicator {indicator!r} was not recorded (this model provides "
                          f"{', '.join(recording.indicators) or 'none'})")
    xs, ys = [], []
    for traj in recording.trajectories:
        xs.extend(traj.indicator_change[indicator][1:])
        ys.extend(traj.step_change())
    return fit_polynomial(xs, ys, degree, indicator)


def magnitude_ratios(recording: Recording) -> list[list[float]]:
    """MagCache's ratios per branch and step: the mean over recorded generations of
    ``mean_tokens(|R_t| / |R_{t-1}|)`` (1.0 at step 0)."""
    table = []
    for branch in range(recording.num_branches):
        rows = [t.magnitude_ratio for t in recording.trajectories if t.branch_index == branch]
        table.append([float(v) for v in np.mean(np.asarray(rows, dtype=np.float64), axis=0)])
    return table
