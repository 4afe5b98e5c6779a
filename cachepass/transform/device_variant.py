"""The device decision variant (option ``decisions="device"``): one graph that takes the cache decision
on the device and runs only the chosen variant, with ``torch.cond``.

A policy states its rule as a :class:`DeviceRule` (``policy.device_rule()``, ``None`` when it has none):
the relative L1 change of the indicator against a reference, optionally rescaled by a polynomial and
accumulated, compared with a threshold. :func:`build_device_step` writes the **step** graph from the
compute and reuse variants:

    step(*inputs, *exported, indicator, *cache, reference, acc?) -> (*outputs, computed, reference'?, acc'?)

* ``change = poly(|indicator - reference|_1 / |reference|_1)`` (the sums in float32 at least, as
  :func:`cachepass.policies.distance.l1_sums`; the ratio and the polynomial in float64, Horner's scheme as
  ``numpy.polyval``, so the decision is bit for bit the host path's);
* ``accumulate`` (TeaCache): ``acc' = acc + change``; reuse while ``change`` is finite and ``acc' < threshold``,
  else ``acc' = 0``. Otherwise (First-Block-Cache): reuse while ``change < threshold``;
* ``torch.cond(reuse, reuse_branch, compute_branch, operands)``: the compute branch is the compute variant
  writing its cache writes **in place** into the cache tensors it was given (a ``cond`` branch may not
  return an alias of its inputs, and a copy per reuse call is what in-place writes avoid; inductor fuses
  each residual ``end - start`` into its cache tensor), and, for a ``computed`` reference, the indicator
  into the reference; the reuse branch is the reuse variant reading the cache tensors;
* reference ``previous`` (TeaCache): ``reference'`` is this call's indicator, returned every call.

The state (cache tensors, reference, ``acc``) lives on the device and goes in and out of the graph, so
one compiled graph serves every call that is not forced. Forced calls (the rule's first / last steps, a
branch without a cache) are known on the host from the step, and run the compute variant directly
(:mod:`cachepass.runtime.device_program`).

Supported: a policy whose rule is a :class:`DeviceRule`, residual reuse at granularity ``stack``
(:class:`~cachepass.reconstruction.ResidualReuse`), no observed tensors, tensor outputs only;
:func:`unsupported_reason` says why not otherwise.

torch 2.13's ``torch.cond`` reads its predicate back to the host to choose the branch (eager:
``if pred:`` in ``cond_op_dense``; inductor: the ``Conditional`` wrapper code's ``if pred.item():``), except
under CUDA graph capture, whose conditional nodes branch on the device. So a non-forced call makes exactly
that one read; the statistic, the accumulator, the reference and the decision record stay on the device.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..policies.base import CallContext, is_forced_step
from ..reconstruction import ADDED_PREFIX, ResidualReuse

REFERENCES = ("previous", "computed")


@dataclass(frozen=True)
class DeviceRule:
    """A decision rule the device can take: ``change = poly(relative L1 of the indicator against the
    reference)``; reuse while ``change`` (``accumulate``: the sum of the changes since the last computed
    call) is finite and below ``threshold``.

    * ``reference``: ``"previous"``, the indicator of the previous call, computed or not (TeaCache);
      ``"computed"``, the indicator at the last computed call (First-Block-Cache);
    * ``coefficients``: the polynomial, highest power first (``numpy.poly1d`` order); ``None``: the change is
      the relative L1 itself;
    * ``first`` / ``last``: forced steps (:func:`~cachepass.policies.base.is_forced_step`);
    * ``check_steps``: called with the step count at step 0 (a calibrated policy's profile check).
    """

    threshold: float
    reference: str = "previous"
    accumulate: bool = False
    coefficients: tuple[float, ...] | None = None
    first: int = 1
    last: int = 0
    check_steps: Callable[[int | None], None] | None = None

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"DeviceRule.reference must be one of {REFERENCES}, got {self.reference!r}")

    def forced(self, ctx: CallContext) -> bool:
        return is_forced_step(ctx, self.first, self.last)

    @property
    def returns_reference(self) -> bool:
        return self.reference == "previous"


@dataclass
class DeviceStep:
    """The step graph and how its inputs and outputs are laid out."""

    gm: fx.GraphModule
    examples: list  # example inputs (Dynamo's, then fake tensors for the rest)
    num_outputs: int
    num_cache: int
    returns_reference: bool
    accumulate: bool


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _output_values(gm: fx.GraphModule) -> tuple:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _example(node) -> object:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def unsupported_reason(rule, requirements, variants) -> str | None:
    """Why the device variant cannot be built for this policy and graph, or ``None``."""
    if rule is None:
        return "the policy states no device rule"
    if not isinstance(rule, DeviceRule):
        return f"the policy's device rule is a {type(rule).__name__}, not a DeviceRule"
    reconstruction = requirements.reconstruction
    if type(reconstruction) is not ResidualReuse or reconstruction.granularity != "stack":
        return (f"reconstruction {getattr(reconstruction, 'name', type(reconstruction).__name__)!r} at granularity "
                f"{getattr(reconstruction, 'granularity', '?')!r}: the device path serves residual reuse at "
                "granularity 'stack' only")
    if requirements.observe:
        return "the policy observes body tensors"
    if not variants.has_indicator:
        return "the policy decides on no indicator"
    if variants.num_cache_inputs != variants.num_cache_writes:
        return "the reuse variant reads another number of cache tensors than the compute variant writes"
    indicator = _example(_output_values(variants.head)[0])
    if not isinstance(indicator, torch.Tensor):
        return "the indicator's example value is unknown"
    compute_out = _output_values(variants.compute)
    if not all(isinstance(_example(v), torch.Tensor) for v in compute_out[:variants.num_outputs + variants.num_cache_writes]):
        return "an output or a cache write is not a tensor (torch.cond returns tensors)"
    return None


class _Emit:
    """``graph.call_function`` with shorter calls."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph

    def __call__(self, fn, *args, name: str | None = None, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs, name=name)


def _relative_l1(emit: _Emit, now: fx.Node, before: fx.Node, dtype: torch.dtype) -> fx.Node:
    """``sum|now - before| / sum|before|`` as a 0-d float64 node: the sums in ``dtype`` (float32 at least),
    a zero reference gives 0 when nothing changed and ``inf`` otherwise (:func:`~cachepass.policies.distance.l1_ratio`)."""
    work = torch.promote_types(dtype, torch.float32)
    now_w = emit(torch.Tensor.to, now, work)
    before_w = emit(torch.Tensor.to, before, work)
    num = emit(torch.Tensor.to, emit(torch.sum, emit(torch.abs, emit(torch.sub, now_w, before_w))), torch.float64)
    den = emit(torch.Tensor.to, emit(torch.sum, emit(torch.abs, before_w)), torch.float64)
    zero_ref = emit(torch.where, emit(torch.eq, num, 0.0), emit(torch.zeros_like, num),
                    emit(torch.full_like, num, math.inf))
    return emit(torch.where, emit(torch.eq, den, 0.0), zero_ref, emit(torch.div, num, den), name=f"{ADDED_PREFIX}change")


def _polynomial(emit: _Emit, x: fx.Node, coefficients) -> fx.Node:
    """``numpy.polyval(coefficients, x)`` node by node: ``y = 0; y = y * x + c`` for each coefficient (no
    fused multiply-add in eager, as numpy)."""
    y = emit(torch.zeros_like, x)
    for c in coefficients:
        y = emit(torch.add, emit(torch.mul, y, x), float(c))
    return y


def _branch(source: fx.GraphModule, operands: list[fx.Node], mapped: list[int], *, writes_into: list[int] = (),
            extra_copies: tuple[tuple[int, int], ...] = (), num_outputs: int) -> fx.GraphModule:
    """A ``cond`` branch: placeholders for every operand; ``source``'s placeholders are the operands at
    ``mapped``; it returns ``source``'s first ``num_outputs`` outputs, copies its next outputs into the operands
    at ``writes_into`` and operand ``src`` into operand ``dst`` for each ``(dst, src)`` of ``extra_copies``."""
    graph = fx.Graph()
    phs = []
    for op in operands:
        ph = graph.placeholder(op.name)
        ph.meta = dict(op.meta)
        phs.append(ph)
    env = dict(zip(_placeholders(source), (phs[i] for i in mapped)))
    for node in source.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    values = fx.map_arg(_output_values(source), lambda n: env[n])
    for slot, value in zip(writes_into, values[num_outputs:]):
        graph.call_function(torch.Tensor.copy_, (phs[slot], value))
    for dst, src in extra_copies:
        graph.call_function(torch.Tensor.copy_, (phs[dst], phs[src]))
    graph.output(tuple(values[:num_outputs]))
    graph.lint()
    return fx.GraphModule(source, graph)


BRANCHES = ("cond", "select")


def cond_eagerly(pred, true_fn, false_fn, operands):
    """What ``torch.cond`` does on a CPU or CUDA tensor outside compilation (``cond_op_dense``: ``if pred:``),
    without the higher-order operator's per-call dispatch (a pytree walk over every operand, the model's
    parameters included, and an autograd wrapper even under ``no_grad``: a few ms per call on the embedded
    model). The step graph calls it instead of ``torch.ops.higher_order.cond`` when ``inner`` is ``"eager"``."""
    return true_fn(*operands) if pred else false_fn(*operands)


def build_device_step(variants, rule: DeviceRule, example_inputs, branch: str = "cond",
                      eager: bool = False) -> DeviceStep:
    """The step graph of the module docstring, from the built variants (check :func:`unsupported_reason`
    first) and Dynamo's example inputs.

    ``branch="select"`` replaces ``torch.cond`` by running both variants and selecting with ``torch.where``
    (outputs, cache tensors, reference): nothing is read back, nothing is skipped either. It is there to
    measure the step graph without ``cond`` (``benchmarks/device_decisions.py``, the host-read tests).
    ``eager``: the graph runs as Python (``inner="eager"``), so ``cond`` is :func:`cond_eagerly`."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    n_in, n_exp = len(example_inputs), variants.num_exported
    n_out, n_cache = variants.num_outputs, variants.num_cache_writes
    compute_phs = _placeholders(variants.compute)
    reuse_phs = _placeholders(variants.reuse)
    indicator_example = _example(_output_values(variants.head)[0])
    cache_examples = [_example(v) for v in _output_values(variants.compute)[n_out:n_out + n_cache]]

    graph = fx.Graph()
    emit = _Emit(graph)
    examples = list(example_inputs) + [_example(p) for p in compute_phs[n_in:n_in + n_exp]]
    inputs = []
    for ph in compute_phs[:n_in + n_exp]:  # the graph's inputs and the exported head values
        inputs.append(graph.node_copy(ph))

    def add(name, example):
        # a tensor of its own for each placeholder: AOTAutograd takes inputs given as one object for
        # duplicates and compiles for that (the indicator and the reference are two tensors at run time)
        example = example.new_empty_strided(example.size(), example.stride())
        ph = graph.placeholder(f"{ADDED_PREFIX}{name}")
        ph.meta["example_value"] = example
        examples.append(example)
        return ph

    indicator = add("indicator", indicator_example)
    cache = [add(f"cache_{i}", e) for i, e in enumerate(cache_examples)]
    reference = add("reference", indicator_example)
    acc = add("accumulated", indicator_example.new_zeros((), dtype=torch.float64)) if rule.accumulate else None

    change = _relative_l1(emit, indicator, reference, indicator_example.dtype)
    if rule.coefficients is not None:
        change = _polynomial(emit, change, rule.coefficients)
    finite = emit(torch.isfinite, change)
    if rule.accumulate:
        total = emit(torch.add, acc, change)
        reuse = emit(torch.logical_and, finite, emit(torch.lt, total, rule.threshold), name=f"{ADDED_PREFIX}reuse")
        acc_out = emit(torch.where, reuse, total, emit(torch.zeros_like, total))
    else:
        reuse = emit(torch.logical_and, finite, emit(torch.lt, change, rule.threshold), name=f"{ADDED_PREFIX}reuse")

    # cond's operands: inputs, exported, cache tensors, indicator, reference
    operands = inputs + cache + [indicator, reference]
    base = n_in + n_exp
    slot_indicator, slot_reference = base + n_cache, base + n_cache + 1
    names = {"compute": f"{ADDED_PREFIX}compute_branch", "reuse": f"{ADDED_PREFIX}reuse_branch"}
    reuse_branch = _branch(variants.reuse, operands, list(range(base + n_cache))[:len(reuse_phs)], num_outputs=n_out)
    if branch == "cond":
        compute_branch = _branch(
            variants.compute, operands, list(range(base)), writes_into=list(range(base, base + n_cache)),
            extra_copies=((slot_reference, slot_indicator),) if rule.reference == "computed" else (),
            num_outputs=n_out)
        cond = emit(cond_eagerly if eager else torch.ops.higher_order.cond, reuse, graph.get_attr(names["reuse"]),
                    graph.get_attr(names["compute"]), tuple(operands), name=f"{ADDED_PREFIX}cond")
        outputs = [emit(operator.getitem, cond, i) for i in range(n_out)]
    else:  # both run; the results are selected
        compute_branch = _branch(variants.compute, operands, list(range(base)), num_outputs=n_out + n_cache)
        reused = graph.call_module(names["reuse"], tuple(operands))
        computed = graph.call_module(names["compute"], tuple(operands))
        outputs = [emit(torch.where, reuse, emit(operator.getitem, reused, i), emit(operator.getitem, computed, i))
                   for i in range(n_out)]
        for i, tensor in enumerate(cache):
            emit(torch.Tensor.copy_, tensor, emit(torch.where, reuse, tensor, emit(operator.getitem, computed, n_out + i)))
        if rule.reference == "computed":
            emit(torch.Tensor.copy_, reference, emit(torch.where, reuse, reference, indicator))
    results = outputs + [emit(torch.logical_not, reuse, name=f"{ADDED_PREFIX}computed")]
    if rule.returns_reference:
        results.append(emit(torch.clone, indicator, name=f"{ADDED_PREFIX}previous"))
    if rule.accumulate:
        results.append(acc_out)
    graph.output(tuple(results))
    graph.lint()
    gm = fx.GraphModule({names["compute"]: compute_branch, names["reuse"]: reuse_branch}, graph)
    gm.meta.update(variants.compute.meta)
    return DeviceStep(gm, examples, n_out, n_cache, rule.returns_reference, rule.accumulate)
