"""Taylor extrapolation of a cached tensor from the steps where it was computed.

TaylorSeer predicts a feature ``k`` steps after its last computation as ``F^ = sum_i D_i k^i / i!``,
where ``D_i`` estimates the i-th derivative (in steps) from finite differences over the computed steps.
Here ``D_i`` are the derivatives, at the newest computed step, of the polynomial through the last
``m + 1`` computed values (``m`` = the order, fewer while too few steps have been computed). With the
real gaps between computed steps this is exact for any feature that is a polynomial of degree ``<= m``
in the step, even gaps or not. At order 1 it is the reference's ``{0: F, 1: (F - F_old) / gap}``.

The coefficients are derived symbolically with sympy once per order (gaps stay symbols) and turned
into fast numeric functions; nobody writes a finite-difference stencil by hand.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

MAX_ORDER = 4


@functools.cache
def derivative_weights_symbolic(order: int):
    """``(gaps, W)`` as sympy symbols and matrix: ``D_i = sum_j W[i, j] F_j`` for the values ``F_0``
    (newest computed step), ``F_1`` (``g1`` steps earlier), ``F_2`` (``g1 + g2`` earlier), ...
    ``F_order``. Row ``i`` is the i-th derivative at 0 of the Lagrange basis through those points."""
    import sympy  # deferred: only Taylor policies pay for importing it

    gaps = sympy.symbols(f"g1:{order + 1}", positive=True)
    x = sympy.Symbol("x")
    nodes = [sympy.Integer(0)]
    for g in gaps:
        nodes.append(nodes[-1] - g)
    rows = []
    for i in range(order + 1):
        row = []
        for j, xj in enumerate(nodes):
            basis = sympy.Mul(*[(x - xm) / (xj - xm) for m, xm in enumerate(nodes) if m != j])
            row.append(sympy.factor(sympy.diff(basis, x, i).subs(x, 0)))
        rows.append(row)
    return gaps, sympy.Matrix(rows)


@functools.cache
def _derivative_weights_fn(order: int) -> Callable[..., np.ndarray]:
    import sympy

    gaps, matrix = derivative_weights_symbolic(order)
    return sympy.lambdify(gaps, matrix, "numpy")


def derivative_weights(gaps: Sequence[float]) -> np.ndarray:
    """Numeric ``W`` (``len(gaps) + 1`` square) for the given gaps between computed steps, newest first."""
    if len(gaps) == 0:
        return np.ones((1, 1))
    return np.asarray(_derivative_weights_fn(len(gaps))(*map(float, gaps)), dtype=np.float64)


@functools.cache
def _taylor_terms_fn(order: int) -> Callable[[float], list]:
    import sympy

    k = sympy.Symbol("k")
    return sympy.lambdify(k, [k**i / sympy.factorial(i) for i in range(order + 1)], "math")


def taylor_coefficients(k: float, order: int) -> list[float]:
    """``[k^i / i! for i in 0..order]``: the weights of ``D_0..D_order`` in the prediction."""
    if order == 0:  # ``[1.0]`` without sympy (a cache read before a second computed step)
        return [1.0]
    return [float(c) for c in _taylor_terms_fn(order)(float(k))]


def update_matrix(order: int, gap: float, old_gaps: Sequence[float], old_order: int | None) -> tuple[np.ndarray, tuple]:
    """Derivatives after a new computation, as a linear map of what the cache already holds.

    The cache keeps the derivatives ``D_old`` (order ``old_order``, ``None`` if empty) at the previous
    computed step and the gaps between the steps they were fitted on (``old_gaps``, newest first). The
    old values needed again are recovered exactly from ``D_old`` (the old polynomial interpolates them).
    Returns ``(A, new_gaps)`` with ``D_new = A @ [F_new, D_old_0, ..., D_old_{old_order}]``.
    """
    if old_order is None:
        return np.ones((1, 1)), ()
    m = min(order, old_order + 1)
    new_gaps = (float(gap),) + tuple(old_gaps[: m - 1])
    weights = derivative_weights(new_gaps)  # (m+1) x (m+1), over [F_new, F_1..F_m]
    recover = np.zeros((m + 1, old_order + 2))  # [F_new, F_1..F_m] from [F_new, D_old...]
    recover[0, 0] = 1.0
    offset = 0.0  # position of F_j relative to the previous computed step (F_1)
    for j in range(1, m + 1):
        if j >= 2:
            offset -= old_gaps[j - 2]
        recover[j, 1:] = [offset**l / math.factorial(l) for l in range(old_order + 1)]
    return weights @ recover, new_gaps
