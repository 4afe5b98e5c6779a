"""Taylor prediction: sympy-derived coefficients, and exact prediction of polynomial tensors through
the real ``TaylorReuse`` graph nodes and cache, with uneven gaps between computed steps."""

from __future__ import annotations

import math
import operator

import pytest
import sympy
import torch
import torch.fx as fx

from cachepass.reconstruction import TaylorReuse, taylor
from cachepass.transform.variants import placeholder_adder


def test_order_1_coefficients_are_the_backward_difference():
    (g1,), w = taylor.derivative_weights_symbolic(1)
    assert sympy.simplify(w - sympy.Matrix([[1, 0], [1 / g1, -1 / g1]])) == sympy.zeros(2, 2)


def test_order_2_coefficients_match_hand_derivation():
    (g1, g2), w = taylor.derivative_weights_symbolic(2)
    hand = sympy.Matrix([
        [1, 0, 0],
        [(2 * g1 + g2) / (g1 * (g1 + g2)), -(g1 + g2) / (g1 * g2), g1 / (g2 * (g1 + g2))],
        [2 / (g1 * (g1 + g2)), -2 / (g1 * g2), 2 / (g2 * (g1 + g2))],
    ])
    assert sympy.simplify(w - hand) == sympy.zeros(3, 3)
    # even gaps h: the textbook second-order backward stencils
    h = sympy.Symbol("h", positive=True)
    even = sympy.simplify(w.subs({g1: h, g2: h}))
    assert even == sympy.Matrix([[1, 0, 0], [3 / (2 * h), -2 / h, 1 / (2 * h)], [1 / h**2, -2 / h**2, 1 / h**2]])


def test_numeric_weights_and_taylor_terms():
    assert taylor.derivative_weights([2.0, 2.0]).tolist() == [[1, 0, 0], [0.75, -1, 0.25], [0.25, -0.5, 0.25]]
    assert taylor.taylor_coefficients(3, 4) == [1.0, 3.0, 4.5, 4.5, 3.375]


def _reuse_graph(order: int, num_pairs: int) -> fx.GraphModule:
    """The reconstruction's nodes alone: stream inputs -> rebuilt outputs, as the reuse variant builds them."""
    graph = fx.Graph()
    inputs = []
    for p in range(num_pairs):
        x = graph.placeholder(f"x{p}")
        x.meta["example_value"] = torch.empty(2, 3, dtype=torch.float64)
        inputs.append(x)

    predictions = TaylorReuse(order).predict(graph, [x.meta["example_value"] for x in inputs],
                                             placeholder_adder(graph))
    graph.output(tuple(graph.call_function(operator.add, (x, p)) for x, p in zip(inputs, predictions)))
    graph.lint()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == num_pairs + 1 + num_pairs * (order + 1)  # one shared coefficient vector
    return fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_polynomial_tensor_is_predicted_exactly_with_uneven_gaps(order):
    torch.manual_seed(order)
    coeffs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(order + 1)]  # degree == order

    def value(s):
        return sum(c * float(s) ** j for j, c in enumerate(coeffs))

    gm = _reuse_graph(order, num_pairs=2)
    cache = TaylorReuse(order).new_cache()
    x = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    computed = [0, 1, 3, 4, 7, 9, 10, 13]  # gaps 1, 2, 1, 3, 2, 1, 3
    for i, step in enumerate(computed):
        cache.write([value(step), 2 * value(step)], step)
        if i < order:  # not enough points yet for this degree
            continue
        for k in (1, 2, 5):
            out = gm(*x, *cache.read(step + k))
            torch.testing.assert_close(out[0], x[0] + value(step + k), rtol=1e-9, atol=1e-8)
            torch.testing.assert_close(out[1], x[1] + 2 * value(step + k), rtol=1e-9, atol=1e-8)
    assert cache.nbytes() == 2 * (order + 1) * 6 * 8


@pytest.mark.parametrize("order", [2, 4])
def test_lower_degree_tensor_exact_while_warming_up(order):
    """After m+1 < order+1 computed steps the fit has order m: a degree-m tensor is already exact."""
    base, slope = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    gm = _reuse_graph(order, num_pairs=1)
    cache = TaylorReuse(order).new_cache()
    x = torch.zeros(2, 3, dtype=torch.float64)
    cache.write([base], 0)
    torch.testing.assert_close(gm(x, *cache.read(3))[0], base)  # one point: the last value
    cache.write([base + 2 * slope], 2)
    torch.testing.assert_close(gm(x, *cache.read(5))[0], base + 5 * slope)  # two points: a line


def test_order_1_is_the_reference_residual_plus_step_times_slope():
    """CustomCache's reference formula: ``x_in + R + k * (R - R_prev) / gap``."""
    gm = _reuse_graph(1, num_pairs=1)
    cache = TaylorReuse(1).new_cache()
    r_prev, r = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    cache.write([r_prev], 4)
    cache.write([r], 7)
    coefficients, *_ = cache.read(9)
    assert coefficients.tolist() == [1.0, 2.0]
    torch.testing.assert_close(gm(x, *cache.read(9))[0], x + r + 2 * (r - r_prev) / 3)


def test_half_precision_cache_keeps_dtype_and_float32_coefficients():
    cache = TaylorReuse(2).new_cache()
    for step in (0, 2, 4):
        cache.write([torch.full((4,), float(step), dtype=torch.bfloat16)], step)
    coefficients, *derivatives = cache.read(5)
    assert coefficients.dtype == torch.float32 and len(derivatives) == 3
    assert all(d.dtype == torch.bfloat16 for d in derivatives)
    assert float(derivatives[1][0]) == pytest.approx(1.0)  # slope of s -> s
    assert math.isclose(float(derivatives[2][0]), 0.0, abs_tol=1e-2)
