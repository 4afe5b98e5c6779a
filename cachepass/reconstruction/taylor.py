"""Taylor extrapolation of a cached tensor from the steps where it was computed: the coefficients and
:class:`TaylorReuse`, the reconstruction that uses them.

TaylorSeer predicts a cached tensor ``k`` steps after its last computation as ``F^ = sum_i D_i k^i / i!``,
where ``D_i`` estimates the i-th derivative (in steps) from finite differences over the computed steps.
Here ``D_i`` are the derivatives, at the newest computed step, of the polynomial through the last
``m + 1`` computed values (``m`` = the order, fewer while too few steps have been computed). With the
real gaps between computed steps this is exact for any tensor that is a polynomial of degree ``<= m``
in the step, even gaps or not. At order 1 it is the reference's ``{0: F, 1: (F - F_old) / gap}``.

The coefficients are derived symbolically with sympy once per order (gaps stay symbols) and turned
into fast numeric functions; nobody writes a finite-difference stencil by hand.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .base import ADDED_PREFIX, Reconstruction, ReuseCache, _tensor_nbytes

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
        recover[j, 1:] = [offset**p / math.factorial(p) for p in range(old_order + 1)]
    return weights @ recover, new_gaps


# --- the reconstruction ------------------------------------------------------------------------

class _TaylorCache(ReuseCache):
    """Per branch: the derivative tensors ``D_0..D_m`` of each cached residual at the last computed step.

    Orders not fitted yet (``m < order`` while warming up) are served as ``D_0`` with coefficient 0,
    so a reuse call never allocates zeros and the placeholder layout never changes.
    """

    def __init__(self, order: int) -> None:
        self.order = order
        self.derivatives: list[list[torch.Tensor]] | None = None  # per residual: [D_0..D_m]
        self.gaps: tuple[float, ...] = ()
        self.step: int | None = None

    def write(self, residuals, step):
        old_order = None if self.derivatives is None else len(self.derivatives[0]) - 1
        gap = 0 if self.step is None else step - self.step
        if gap <= 0:  # first write, or the same step written again: start over from this value
            old_order, self.gaps = None, ()
        matrix, self.gaps = update_matrix(self.order, gap, self.gaps, old_order)
        old = self.derivatives if old_order is not None else [[] for _ in residuals]
        self.derivatives = [_combine(matrix, [r, *d]) for r, d in zip(residuals, old)]
        self.step = step

    def read(self, step):
        if self.derivatives is None:
            raise RuntimeError("cachepass: reuse before any compute: the runtime must compute first")
        fitted = len(self.derivatives[0]) - 1
        first = self.derivatives[0][0]
        coefficients = taylor_coefficients(step - self.step, fitted) + [0.0] * (self.order - fitted)
        out = [torch.tensor(coefficients, dtype=_coefficient_dtype(first.dtype), device=first.device)]
        for d in self.derivatives:
            out.extend(d + [d[0]] * (self.order - fitted))
        return out

    def ready(self):
        return self.derivatives is not None

    def nbytes(self):
        return _tensor_nbytes(t for d in self.derivatives or () for t in d)


def _coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, else float32 (a 0-d factor keeps the tensor's own dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _combine(matrix, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[sum_j matrix[i, j] * tensors[j] for each row i]``, accumulated in at least float32."""
    ref = tensors[0]
    work = torch.promote_types(ref.dtype, torch.float32)
    out = []
    for row in matrix:
        if row[0] == 1.0 and not row[1:].any():  # D_0 = F_new: keep the tensor, no copy
            out.append(ref)
            continue
        acc = None
        for weight, t in zip(row.tolist(), tensors):
            if weight == 0.0:
                continue
            term = t.to(work) * weight
            acc = term if acc is None else acc.add_(term)
        out.append((acc if acc is not None else torch.zeros_like(ref, dtype=work)).to(ref.dtype))
    return out


@dataclass(frozen=True)
class TaylorReuse(Reconstruction):
    """Predict each cached tensor by its Taylor expansion ``sum_i c_i * D_i`` with ``c_i = k^i / i!``,
    ``k`` the steps since the last computed one (the coefficients above).

    Graph side: one shared coefficient placeholder (``order + 1`` float32 values, float64 for float64
    tensors, made per reuse call on the tensors' device) and ``order + 1`` derivative placeholders per
    cached tensor; the sum is written as graph nodes (the "Taylor nodes"), so the inner compiler fuses it
    with the rest of the reuse variant. Memory: ``order + 1`` tensors per cached tensor and branch
    (``stack``: one residual per stream tensor; ``block``: every attention / feed-forward output).
    """

    order: int = 1
    name: str = "taylor"
    granularity: str = "stack"

    def predict(self, graph, examples, add_placeholder):
        return weighted_sums(graph, examples, add_placeholder, f"{ADDED_PREFIX}taylor", self.order + 1,
                             weight_tag="coefficients", term_tag="c", stored_tag="d")

    def new_cache(self):
        return _TaylorCache(self.order)


def weighted_sums(graph, examples, add_placeholder, name: str, count: int, *, weight_tag: str, term_tag: str,
                  stored_tag: str) -> list:
    """Reuse-graph nodes for ``sum_i w[i] * stored_i`` per cached tensor: one placeholder ``name_<weight_tag>``
    holding the ``count`` weights (float32, float64 for float64 tensors), and per cached tensor ``p`` the
    placeholders ``name_<stored_tag><i>_<p>`` of what the cache stores. What Taylor (derivatives) and FoCa
    (past residuals) reconstructions both predict with."""
    if not examples:
        return []
    first = examples[0]
    example = None
    if isinstance(first, torch.Tensor):
        example = first.new_empty((count,), dtype=_coefficient_dtype(first.dtype))
    weights = add_placeholder(f"{name}_{weight_tag}", example)
    terms = [graph.call_function(operator.getitem, (weights, i), name=f"{name}_{term_tag}{i}") for i in range(count)]
    outputs = []
    for p, value in enumerate(examples):
        out = None
        for i, w in enumerate(terms):
            stored = add_placeholder(f"{name}_{stored_tag}{i}_{p}", value)
            scaled = graph.call_function(operator.mul, (w, stored), name=f"{name}_{p}_term{i}")
            out = scaled if out is None else graph.call_function(operator.add, (out, scaled), name=f"{name}_{p}_sum{i}")
            scaled.meta["example_value"] = out.meta["example_value"] = value
        outputs.append(out)
    return outputs
