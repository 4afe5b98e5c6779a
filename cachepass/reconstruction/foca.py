"""FoCa-style predictor-corrector reconstruction: cached features as the solution of an ODE.

FoCa ("Forecast then Calibrate", arXiv 2508.16211) treats a cached tensor ``F(tau)`` as the solution of
an ODE in the sampling time ``tau`` and advances it from the last computed steps with a multistep
integrator instead of a Taylor polynomial. Here, for the values ``F_0`` (newest computed step, time
``tau_0``), ``F_1``, ``F_2`` and a skipped call at ``tau`` (``h = tau - tau_0``):

* slope at the last computed step: the variable-step BDF2 derivative, i.e. the derivative at ``tau_0`` of
  the quadratic through the three points, ``D_0``;
* forecast (predictor): ``F^p = F_0 + h D_0``;
* calibrate (Heun-type corrector): the slope at ``tau`` of the quadratic through ``(tau, F^p)``,
  ``(tau_0, F_0)``, ``(tau_1, F_1)`` (BDF2 applied at the new point), ``D^p``; then
  ``F^c = F_0 + h (D_0 + D^p) / 2``.

Every stage is linear in the stored values, so the prediction is ``sum_j w_j F_j`` with weights computed
on the host per reuse call (a few flops: :func:`foca_weights`); the reuse variant's graph holds the
weighted sum, so the inner compiler fuses it with the rest. With two points the scheme is linear
extrapolation, with one the value itself. On even gaps and ``h`` one gap the weights are
``[2.625, -2.25, 0.625]``: between linear (``[2, -1, 0]``) and quadratic (``[3, -3, 1]``) extrapolation,
exact for linear trajectories and damped on curved ones (quadratic extrapolation amplifies noise over
long gaps; this is the stability FoCa is after).

Time: the call's real timestep when the runtime gave it for every stored step and the skipped one
(:meth:`~cachepass.reconstruction.ReuseCache.note_time`; FLUX's and Wan's shifted schedules have uneven
steps), else the step index. Memory: ``points`` tensors per cached tensor and branch (3 with the
corrector's quadratic; the tensors the compute variant wrote, kept by reference: no copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .base import ADDED_PREFIX, Reconstruction, ReuseCache, _tensor_nbytes
from .taylor import weighted_sums

#: Clocks the prediction can run on: the timestep (step index where a timestep is missing) or the step.
CLOCKS = ("timestep", "step")

#: How many timesteps a cache remembers (the stored steps' and the current one's).
_TIME_MEMORY = 16


def _lagrange_derivative(nodes: Sequence[float], at: float) -> np.ndarray:
    """Weights ``a`` with ``p'(at) = sum_j a_j y_j`` for the polynomial ``p`` through ``(nodes_j, y_j)``."""
    nodes = np.asarray(nodes, dtype=np.float64)
    n = len(nodes)
    out = np.zeros(n)
    for j in range(n):
        others = [m for m in range(n) if m != j]
        denom = np.prod([nodes[j] - nodes[m] for m in others])
        # d/dx prod_{m != j} (x - x_m) at x = at
        total = 0.0
        for skip in others:
            total += np.prod([at - nodes[m] for m in others if m != skip])
        out[j] = total / denom
    return out


def foca_weights(times: Sequence[float], target: float, corrector: bool = True) -> np.ndarray:
    """The weights ``w`` of the prediction ``sum_j w_j F_j`` at time ``target`` from the values stored at
    ``times`` (newest first; at most the first three are used, the rest get weight 0).

    One point: ``[1]``. Two: linear extrapolation. Three: BDF2 slope, forecast and (``corrector``) the
    Heun-type calibration of the module docstring. Times must be distinct; ``target`` may be any time."""
    n = len(times)
    out = np.zeros(n)
    if n == 0:
        return out
    h = float(target) - float(times[0])
    if n == 1 or h == 0.0:
        out[0] = 1.0
        return out
    if n == 2:
        t0, t1 = float(times[0]), float(times[1])
        out[0], out[1] = 1.0 + h / (t0 - t1), -h / (t0 - t1)
        return out
    nodes = [float(t) for t in times[:3]]
    e0 = np.array([1.0, 0.0, 0.0])
    d0 = _lagrange_derivative(nodes, nodes[0])  # BDF2 slope at tau_0
    forecast = e0 + h * d0
    if not corrector:
        out[:3] = forecast
        return out
    # slope at the target of the quadratic through (target, F^p), (tau_0, F_0), (tau_1, F_1)
    a = _lagrange_derivative([float(target), nodes[0], nodes[1]], float(target))
    slope = a[0] * forecast + a[1] * e0 + a[2] * np.array([0.0, 1.0, 0.0])
    out[:3] = e0 + 0.5 * h * (d0 + slope)
    return out


class _MultistepCache(ReuseCache):
    """Per branch: the cache writes of the last ``points`` computed steps (newest first) and their times."""

    def __init__(self, points: int, clock: str, corrector: bool) -> None:
        self.points, self.clock, self.corrector = points, clock, corrector
        self.values: list[list[torch.Tensor]] = []  # per stored step: its cache writes
        self.steps: list[int] = []
        self.timesteps: dict[int, float] = {}

    def note_time(self, step, timestep):
        if timestep is None or self.clock != "timestep":
            return
        self.timesteps[step] = float(timestep)
        if len(self.timesteps) > _TIME_MEMORY:
            keep = set(self.steps) | {step}
            for s in sorted(self.timesteps)[:-_TIME_MEMORY]:
                if s not in keep:
                    del self.timesteps[s]

    def write(self, residuals, step):
        if self.steps and step <= self.steps[0]:  # the same step again, or a new start: begin afresh
            self.values, self.steps = [], []
        self.values.insert(0, list(residuals))
        self.steps.insert(0, step)
        del self.values[self.points:], self.steps[self.points:]

    def times(self, step: int) -> tuple[list[float], float]:
        """The stored steps' times and ``step``'s: timesteps when all are known (and distinct), else steps."""
        if self.clock == "timestep" and all(s in self.timesteps for s in (*self.steps, step)):
            times = [self.timesteps[s] for s in self.steps]
            if len(set(times)) == len(times) and self.timesteps[step] not in times[:1]:
                return times, self.timesteps[step]
        return [float(s) for s in self.steps], float(step)

    def weights(self, step: int) -> np.ndarray:
        times, target = self.times(step)
        return foca_weights(times, target, self.corrector)

    def read(self, step):
        if not self.values:
            raise RuntimeError("cachepass: reuse before any compute: the runtime must compute first")
        w = list(self.weights(step)) + [0.0] * (self.points - len(self.steps))
        first = self.values[0][0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        out = [torch.tensor(w, dtype=dtype, device=first.device)]
        for p in range(len(self.values[0])):
            stored = [v[p] for v in self.values]
            out.extend(stored + [stored[0]] * (self.points - len(stored)))  # weight 0: any tensor will do
        return out

    def ready(self):
        return bool(self.values)

    def nbytes(self):
        return _tensor_nbytes(t for v in self.values for t in v)


@dataclass(frozen=True)
class FoCaReuse(Reconstruction):
    """Predict each cached tensor by the FoCa predictor-corrector over the last ``points`` computed steps.

    Graph side: one shared weight placeholder (``points`` float32 values, float64 for float64 tensors) and
    ``points`` stored-value placeholders per cached tensor; the weighted sum is graph nodes (fused by the
    inner compiler). ``points``: 3 (BDF2 + corrector, the default) or 2 (linear extrapolation, the scheme
    with two points). ``clock``: ``"timestep"`` (the real timesteps, when the runtime notes them) or
    ``"step"``. Granularity ``stack`` only (the cached span's residuals)."""

    points: int = 3
    clock: str = "timestep"
    corrector: bool = True
    name: str = "foca"
    granularity: str = "stack"

    def predict(self, graph, examples, add_placeholder):
        return weighted_sums(graph, examples, add_placeholder, f"{ADDED_PREFIX}foca", self.points,
                             weight_tag="weights", term_tag="w", stored_tag="f")

    def new_cache(self):
        return _MultistepCache(self.points, self.clock, self.corrector)
