"""The written invariants checked in code: the partition's (``transform/invariants.py``), the graph
variants' input and output counts, the reconstruction's predictions and cache layout. Each check gets
a partition or variants object broken by hand and must raise ``UnsupportedStructure`` naming the nodes
at fault (never a bare ``KeyError``); the unbroken objects of real graphs pass."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.fx as fx
from test_unsupported import Tiny, capture, inputs, tiny_graph

import cachepass
from cachepass import reconstruction as reconstruction_module
from cachepass.analysis.structure import analyse
from cachepass.errors import UnsupportedStructure
from cachepass.policies.base import Requirements
from cachepass.reconstruction import ResidualReuse, ReuseCache, TaylorReuse, check_cache_layout
from cachepass.transform import variants as variants_module
from cachepass.transform.invariants import check_partition, check_variants
from cachepass.transform.partition import partition as make_partition
from cachepass.transform.variants import build_variants

STACK = Requirements()
BLOCK = Requirements(reconstruction=TaylorReuse(order=1, granularity="block"))


def raises(fn, *args) -> str:
    with pytest.raises(UnsupportedStructure) as info:
        fn(*args)
    return str(info.value)


def cut(requirements=STACK, **model):
    _, gm = tiny_graph(**model)
    structure = analyse(gm)
    return gm, structure, make_partition(structure, requirements)


def ordered(structure, nodes):
    return sorted(nodes, key=structure.order.__getitem__)


def test_real_partitions_and_variants_pass():
    for requirements in (STACK, BLOCK, Requirements(compute_first=1, compute_last=1, indicator="front_residual"),
                         Requirements(indicator="modulated_input", reconstruction=TaylorReuse(order=2)),
                         Requirements(reuses=False)):
        gm, structure, partition = cut(requirements)
        assert check_partition(structure, partition) is partition
        variants = build_variants(gm, structure, partition, requirements)
        check_variants(gm, partition, requirements, variants)


# --- the partition -----------------------------------------------------------------------------------

def test_a_node_in_two_regions():
    _, structure, partition = cut()
    node = ordered(structure, partition.cached)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, head=partition.head | {node}))
    assert f"node(s) {node.name!r} are both in head and in cached" in message


def test_a_node_in_no_region():
    _, structure, partition = cut()
    node = ordered(structure, partition.after)[-1]
    message = raises(check_partition, structure, dataclasses.replace(partition, after=partition.after - {node}))
    assert f"node(s) {node.name!r} are in no region" in message


def test_a_node_of_another_graph():
    _, structure, partition = cut()
    _, other, _ = cut()
    stranger = ordered(other, other.body)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, cached=partition.cached | {stranger}))
    assert f"{stranger.name!r} in its regions are not computations of this graph" in message


def test_head_not_closed_under_ancestors():
    _, structure, partition = cut()
    cat = next(n for n in ordered(structure, partition.head) if n.target is torch.cat)  # the sinusoid, read by t_mlp
    reader = next(iter(cat.users))
    broken = dataclasses.replace(partition, head=partition.head - {cat}, cached=partition.cached | {cat})
    message = raises(check_partition, structure, broken)
    assert f"head node {reader.name!r} reads {cat.name!r}, which is in cached" in message


def test_indicator_outside_the_head():
    _, structure, partition = cut(Requirements(indicator="modulated_input"))
    assert partition.indicator in partition.head
    node = ordered(structure, partition.cached)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, indicator=node))
    assert f"the indicator {node.name!r} is in cached" in message
    _, structure, partition = cut(Requirements(indicator="front_residual", compute_first=1))
    node = ordered(structure, partition.cached)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, indicator_base=node))
    assert f"the indicator base {node.name!r} is in cached" in message


def test_exported_values():
    _, structure, partition = cut()
    cached = ordered(structure, partition.cached)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, exported=partition.exported + [cached]))
    assert f"exported value(s) {cached.name!r} are not head values (in cached)" in message

    first, *rest = partition.exported
    reader = next(u for u in first.users if u not in partition.head)
    message = raises(check_partition, structure, dataclasses.replace(partition, exported=rest))
    assert f"head value {first.name!r} (read by {reader.name!r}) is not exported" in message

    message = raises(check_partition, structure, dataclasses.replace(partition, exported=partition.exported + [first]))
    assert f"value(s) {first.name!r} are exported twice" in message
    message = raises(check_partition, structure, dataclasses.replace(partition, exported=partition.exported[::-1]))
    assert "are not in graph order" in message


def test_observed_tensor_of_another_graph():
    _, structure, partition = cut()
    _, other, _ = cut()
    stranger = ordered(other, other.body)[0]
    message = raises(check_partition, structure, dataclasses.replace(partition, observed=[stranger]))
    assert f"observed tensor {stranger.name!r} is not a value of this graph" in message


def test_residual_pairs():
    _, structure, partition = cut(Requirements(compute_last=1))
    (start, end), = partition.pairs
    c = structure.indicators["timestep_embedding"]  # (batch, width): not the stream's shape
    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[(c, end)]))
    assert f"residual pair ({c.name!r}, {end.name!r}): the two are not tensors of one shape" in message

    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[(end, start)]))
    assert f"{end.name!r} is not an ancestor of {start.name!r}" in message

    inside = next(n for n in ordered(structure, partition.cached)  # a cached stream value before the end
                  if n is not end and n.meta["example_value"].shape == end.meta["example_value"].shape)
    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[(inside, end)]))
    assert f"residual pair ({inside.name!r}, {end.name!r}): the start is in cached" in message

    later = structure.stream[0].output  # the body's output: made by the block after the span
    assert later in partition.after
    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[(start, later)]))
    assert f"residual pair ({start.name!r}, {later.name!r}): the end is in after" in message

    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[(start, end), (start, end)]))
    assert f"{end.name!r} is the end of two residual pairs" in message


def test_after_reads_only_what_a_reuse_call_has():
    _, structure, partition = cut(Requirements(compute_last=1))
    (start, end), = partition.pairs
    reader = next(u for u in ordered(structure, end.users) if u in partition.after)
    message = raises(check_partition, structure, dataclasses.replace(partition, pairs=[]))
    assert f"{reader.name!r} after the cached blocks reads {end.name!r}, which is in cached" in message


def test_block_part_outputs():
    _, structure, partition = cut(BLOCK)
    output = partition.part_outputs[0]
    broken = dataclasses.replace(partition, predicted=partition.predicted - {output})
    message = raises(check_partition, structure, broken)
    assert f"cached part output(s) {output.name!r} are not nodes of a predicted block part" in message

    head_node = ordered(structure, partition.head)[-1]
    broken = dataclasses.replace(partition, predicted=partition.predicted | {head_node})
    message = raises(check_partition, structure, broken)
    assert f"predicted node(s) {head_node.name!r} are not in the cached span (in head)" in message

    output.meta["example_value"], saved = 3, output.meta["example_value"]
    try:
        message = raises(check_partition, structure, partition)
    finally:
        output.meta["example_value"] = saved
    assert f"cached part output(s) {output.name!r} are not tensors" in message


def test_a_broken_partition_is_named_not_a_key_error(monkeypatch):
    """Without the partition check, the variants' own lookups name what is missing where."""
    gm, structure, partition = cut()
    monkeypatch.setattr(variants_module, "check_partition", lambda structure, partition: partition)
    cat = next(n for n in ordered(structure, partition.head) if n.target is torch.cat)
    reader = next(iter(cat.users))
    broken = dataclasses.replace(partition, head=partition.head - {cat}, cached=partition.cached | {cat})
    message = raises(build_variants, gm, structure, broken, STACK)
    assert f"head variant: {reader.name!r} reads {cat.name!r}, which that variant neither computes" in message

    first, *rest = partition.exported
    reader = next(u for u in ordered(structure, first.users) if u not in partition.head)
    message = raises(build_variants, gm, structure, dataclasses.replace(partition, exported=rest), STACK)
    assert f"compute variant: {reader.name!r} reads {first.name!r}" in message


# --- the variants ------------------------------------------------------------------------------------

def built(requirements=STACK, **model):
    gm, structure, partition = cut(requirements, **model)
    return gm, partition, build_variants(gm, structure, partition, requirements)


def _drop_last_output(piece: fx.GraphModule) -> fx.GraphModule:
    piece = copy.deepcopy(piece)
    out = next(n for n in piece.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0])[:-1],)
    piece.recompile()
    return piece


def test_variant_output_counts():
    gm, partition, variants = built(Requirements(indicator="modulated_input"))
    assert variants.has_indicator and variants.num_cache_writes == 1
    for name, expected in (("head", f"expected indicator? (1) + {len(partition.exported)} exported"),
                           ("compute", "expected 1 output(s) + 1 cache write(s) + 0 observed"),
                           ("reuse", "expected 1 output(s)")):
        broken = dataclasses.replace(variants, **{name: _drop_last_output(getattr(variants, name))})
        message = raises(check_variants, gm, partition, Requirements(indicator="modulated_input"), broken)
        assert message.startswith(f"{name} variant returns") and expected in message

    message = raises(check_variants, gm, partition, STACK, dataclasses.replace(variants, num_cache_writes=2))
    (_, end), = partition.pairs
    assert f"compute variant: 2 cache write(s) for 0 part output(s) (none) and 1 residual pair(s) " \
           f"(ends {end.name!r})" in message


class TwoOutputs(Tiny):
    def forward(self, x, t):
        return super().forward(x, t), self.embed(x).mean(-1)


def test_variant_outputs_in_the_graphs_order():
    model = TwoOutputs()
    gm = capture(model, *inputs())
    structure = analyse(gm)
    partition = make_partition(structure, STACK)
    variants = build_variants(gm, structure, partition, STACK)
    for name in ("compute", "reuse"):
        piece = copy.deepcopy(getattr(variants, name))
        out = next(n for n in piece.graph.nodes if n.op == "output")
        values = list(out.args[0])
        values[0], values[1] = values[1], values[0]
        out.args = (tuple(values),)
        message = raises(check_variants, gm, partition, STACK, dataclasses.replace(variants, **{name: piece}))
        assert f"{name} variant: its output 0 ({values[0].name}) does not stand for the graph's output 0" in message


def test_variant_placeholder_counts():
    gm, partition, variants = built()
    message = raises(check_variants, gm, partition, STACK,
                     dataclasses.replace(variants, num_cache_inputs=variants.num_cache_inputs + 1))
    assert message.startswith("reuse variant: ") and "placeholder(s)" in message and "cp_cached_0" in message


# --- the reconstruction --------------------------------------------------------------------------------

class _ListCache(ReuseCache):
    def __init__(self, transform):
        self.transform, self.values = transform, None

    def write(self, residuals, step):
        self.values = list(residuals)

    def read(self, step):
        return self.transform(self.values)

    def ready(self):
        return self.values is not None

    def nbytes(self):
        return 0


@dataclasses.dataclass(frozen=True)
class Odd(ResidualReuse):
    """A residual reuse with a bug injected on the graph side (``drop``) or the cache side (``read``)."""

    name: str = "odd"
    drop: bool = False
    foreign: bool = False
    read: object = None

    def predict(self, graph, examples, add_placeholder):
        predictions = super().predict(graph, examples, add_placeholder)
        if self.foreign:
            return [fx.Graph().placeholder("elsewhere") for _ in predictions]
        return predictions[:-1] if self.drop else predictions

    def new_cache(self):
        return _ListCache(self.read) if self.read is not None else super().new_cache()


def _with(reconstruction, **model):
    requirements = Requirements(reconstruction=reconstruction)
    gm, structure, partition = cut(requirements, **model)
    return build_variants, gm, structure, partition, requirements


def test_one_prediction_per_cached_tensor():
    gm, structure, partition = cut()
    (start, _), = partition.pairs
    message = raises(*_with(Odd(drop=True)))
    assert f"reconstruction 'odd': predict returned 0 prediction(s) for the 1 cached tensor(s) {start.name!r}" \
        in message
    message = raises(*_with(Odd(foreign=True)))
    assert f"reconstruction 'odd': its prediction of {start.name!r} is not a node of the reuse graph" in message


def test_cache_reads_match_the_placeholders():
    message = raises(*_with(Odd(read=lambda values: values + values)))
    assert "reconstruction 'odd': its cache reads 2 tensor(s) but predict made 1 cache placeholder(s) " \
           "('cp_cached_0')" in message
    message = raises(*_with(Odd(read=lambda values: [v.double() for v in values])))
    assert "reads a tensor of dtype torch.float64 for the placeholder 'cp_cached_0', whose example has dtype " \
           "torch.float32" in message
    message = raises(*_with(Odd(read=lambda values: [None for v in values])))
    assert "reads a NoneType for the tensor placeholder 'cp_cached_0'" in message
    message = raises(*_with(Odd(read=lambda values: values[5])))
    (_, end), = cut()[2].pairs  # the residual write the compute variant adds: cp_residual_END
    assert f"reconstruction 'odd': its cache fails on the compute variant's cache writes " \
           f"('cp_residual_{end.name}'): IndexError" in message


def test_taylor_cache_layout_at_every_order_and_granularity():
    for order in (1, 2, 4):
        for requirements in (Requirements(reconstruction=TaylorReuse(order=order)),
                             Requirements(reconstruction=TaylorReuse(order=order, granularity="block"))):
            _, partition, variants = built(requirements)
            writes = len(partition.part_outputs) or len(partition.pairs)
            assert variants.num_cache_writes == writes
            assert variants.num_cache_inputs == 1 + (order + 1) * writes  # coefficients, D_0..D_order each


def test_cache_layout_is_checked_at_build_time_only(monkeypatch):
    calls = []
    original = reconstruction_module.check_cache_layout
    monkeypatch.setattr(variants_module, "check_cache_layout", lambda *a: calls.append(1) or original(*a))
    model, _ = tiny_graph()
    fast = torch.compile(model, backend=cachepass.backend(policy="interval", inner="eager"))
    x, t = inputs()
    with torch.no_grad():
        for step in range(6):
            fast(x, torch.tensor([900.0 - 100 * step] * 2))
    stats = cachepass.stats(fast)
    assert stats.caching and calls == [1]


def test_check_cache_layout_directly():
    _, partition, variants = built()
    reuse = variants.reuse
    cache_placeholders = [n for n in reuse.graph.nodes if n.op == "placeholder"][-variants.num_cache_inputs:]
    compute_out = next(n for n in variants.compute.graph.nodes if n.op == "output").args[0]
    writes = list(compute_out[variants.num_outputs:variants.num_outputs + variants.num_cache_writes])
    check_cache_layout(ResidualReuse(), writes, cache_placeholders)
    message = raises(check_cache_layout, TaylorReuse(order=1), writes, cache_placeholders)
    assert "reconstruction 'taylor': its cache reads 3 tensor(s) but predict made 1 cache placeholder(s)" in message
