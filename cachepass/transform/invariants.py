"""The partition's and the graph variants' written invariants, checked where they must hold.

:func:`check_partition` runs before the variants are built from a :class:`Partition`
(:func:`~cachepass.transform.variants.build_variants` calls it):

* the regions: ``head``, ``cached`` and ``after`` are disjoint and together hold every node of the graph
  but its placeholders and its output;
* ``head`` is closed under ancestors (every head node reads only head nodes and graph inputs), so the
  head graph runs alone;
* the indicator (and ``indicator_base``) is a head value or a graph input;
* ``exported`` holds head values only, once each, in graph order, and every head value a variant reads:
  those read by a cached or after node or by the graph's output, the pair starts, the observed tensors;
* granularity ``stack``: each residual pair ``(start, end)`` has one shape and dtype, ``start`` is
  ``end`` or one of its ancestors and is a head value or a graph input, ``end`` is made before the
  blocks after the span (a head or cached node), and no end is paired twice; a joined start
  (:class:`~cachepass.transform.partition.JoinedStart`) is a join of as many tensors as it has parts, the
  join is not in the head and an ancestor of ``end``, and each part (a head value or a graph input) has the
  shape and dtype of the join's input it stands for and is that input or one of its ancestors; a value
  pair's end (a U-Net's deep feature) is a tensor in the cached span; every after
  node and the graph's output read only after nodes, head values, graph inputs and pair ends (what a reuse
  call has);
* granularity ``block``: the cached part outputs are predicted nodes, the predicted nodes are cached
  nodes and every part output is a tensor.

:func:`check_variants` runs on the built graphs: the head returns ``(indicator?, *exported)``, the
compute variant ``(*outputs, *cache writes, *observed)`` with one cache write per residual pair or
part output, the reuse variant ``(*outputs)``, the outputs in the graph's order (output ``i`` of each has
the shape and dtype of the graph's output ``i``); their placeholders are the graph's inputs, then the
exported values, then (reuse) the cache placeholders.

Each raises :class:`~cachepass.errors.UnsupportedStructure` naming the offending nodes. Both are linear in
the graph's size and run once per compiled graph, never per call.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..analysis.residual_stream import join_parts
from ..analysis.values import example_value, tensor_signature
from ..errors import UnsupportedStructure
from .partition import JoinedStart, ValueStart, start_nodes, start_signature


def names(nodes, limit: int = 4) -> str:
    """``'a', 'b', 'c' and 2 more``."""
    nodes = list(nodes)
    shown = ", ".join(repr(n.name) for n in nodes[:limit])
    return (shown + (f" and {len(nodes) - limit} more" if len(nodes) > limit else "")) or "none"


def _region(partition, node: fx.Node) -> str:
    if node.op == "placeholder":
        return "a graph input"
    for name in ("head", "cached", "after"):
        if node in getattr(partition, name):
            return f"in {name}"
    return "in no region"


def check_partition(structure, partition):
    """Raise :class:`UnsupportedStructure` when ``partition`` breaks an invariant of the module docstring;
    return ``partition`` otherwise."""
    graph = structure.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = {n for n in graph.nodes if n.op == "placeholder"}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    by_order = order.__getitem__

    # the regions partition the graph's computation
    regions = (("head", partition.head), ("cached", partition.cached), ("after", partition.after))
    for i, (name_a, a) in enumerate(regions):
        for name_b, b in regions[i + 1:]:
            both = a & b
            if both:
                raise UnsupportedStructure(
                    f"partition: node(s) {names(sorted(both, key=by_order))} are both in {name_a} and in {name_b}")
    everywhere = partition.head | partition.cached | partition.after
    missing = [n for n in nodes if n not in everywhere]
    if missing:
        raise UnsupportedStructure(f"partition: node(s) {names(missing)} are in no region (head, cached, after)")
    foreign = [n for n in everywhere if n not in order or n.op in ("placeholder", "output")]
    if foreign:
        raise UnsupportedStructure(
            f"partition: node(s) {names(foreign)} in its regions are not computations of this graph")

    # the head runs alone
    for node in sorted(partition.head, key=by_order):
        for arg in node.all_input_nodes:
            if arg not in partition.head and arg not in inputs:
                raise UnsupportedStructure(
                    f"partition: the head is not closed under ancestors: head node {node.name!r} reads "
                    f"{arg.name!r}, which is {_region(partition, arg)} (runs after the cache decision)")

    bases = [("indicator base", n) for n in start_nodes(partition.indicator_base)]
    for label, node in (("indicator", partition.indicator), *bases):
        if node is not None and node not in partition.head and node not in inputs:
            raise UnsupportedStructure(
                f"partition: the {label} {node.name!r} is {_region(partition, node)}, not a head value or a graph "
                "input")

    # what the variants receive from the head
    exported = list(partition.exported)
    outside = [n for n in exported if n not in partition.head]
    if outside:
        raise UnsupportedStructure(
            f"partition: exported value(s) {names(outside)} are not head values "
            f"({', '.join(_region(partition, n) for n in outside[:4])})")
    if len(set(exported)) != len(exported):
        twice = [n for i, n in enumerate(exported) if n in exported[:i]]
        raise UnsupportedStructure(f"partition: value(s) {names(twice)} are exported twice")
    if exported != sorted(exported, key=by_order):
        raise UnsupportedStructure(f"partition: the exported values {names(exported)} are not in graph order")
    exported_set = set(exported)
    readers = [(n, arg) for n in sorted(partition.cached | partition.after, key=by_order) for arg in n.all_input_nodes]
    readers += [(output, arg) for arg in output.all_input_nodes]
    readers += [(None, n) for start, _ in partition.pairs for n in start_nodes(start)]
    readers += [(None, node) for node in partition.observed]
    for reader, arg in readers:
        if arg in partition.head and arg not in exported_set:
            by = f"read by {reader.name!r}" if reader is not None else "a residual pair start or observed tensor"
            raise UnsupportedStructure(
                f"partition: head value {arg.name!r} ({by}) is not exported: the variants would not receive it")

    for node in partition.observed:
        if node not in order or node.op == "output":
            raise UnsupportedStructure(f"partition: observed tensor {node.name!r} is not a value of this graph")

    if partition.part_outputs or partition.predicted:  # granularity block
        not_predicted = [n for n in partition.part_outputs if n not in partition.predicted]
        if not_predicted:
            raise UnsupportedStructure(
                f"partition: cached part output(s) {names(not_predicted)} are not nodes of a predicted block part")
        not_cached = sorted((n for n in partition.predicted if n not in partition.cached), key=by_order)
        if not_cached:
            raise UnsupportedStructure(
                f"partition: predicted node(s) {names(not_cached)} are not in the cached span "
                f"({', '.join(_region(partition, n) for n in not_cached[:4])})")
        not_tensors = [n for n in partition.part_outputs if not isinstance(example_value(n), torch.Tensor)]
        if not_tensors:
            raise UnsupportedStructure(f"partition: cached part output(s) {names(not_tensors)} are not tensors")
    else:  # granularity stack
        _check_pairs(structure, partition, inputs)
        have = partition.after | partition.head | inputs | {end for _, end in partition.pairs}
        for reader in sorted(partition.after, key=by_order) + [output]:
            for arg in reader.all_input_nodes:
                if arg not in have:
                    raise UnsupportedStructure(
                        f"partition: {reader.name!r} after the cached blocks reads {arg.name!r}, which is "
                        f"{_region(partition, arg)} and not a residual pair end: a reuse call would not have it")
    return partition


def _check_pairs(structure, partition, inputs: set[fx.Node]) -> None:
    g = structure.dataflow
    seen: set[fx.Node] = set()

    def descends(start, end) -> bool:
        return start is end or (g is not None and start in g and end in g and nx.has_path(g, start, end))

    for start, end in partition.pairs:
        pair = f"residual pair ({start.name!r}, {end.name!r})"
        if isinstance(start, ValueStart):  # a value pair: the cache holds ``end`` itself
            if tensor_signature(end) is None:
                raise UnsupportedStructure(f"partition: value pair of {end.name!r}: it is not a tensor")
            if end not in partition.cached:
                raise UnsupportedStructure(
                    f"partition: value pair of {end.name!r}: it is {_region(partition, end)}, not in the cached span "
                    "(a reuse call would compute it anyway)")
            if end in seen:
                raise UnsupportedStructure(f"partition: {pair}: {end.name!r} is the end of two residual pairs")
            seen.add(end)
            continue
        if start_signature(start) != tensor_signature(end):
            raise UnsupportedStructure(
                f"partition: {pair}: the two are not tensors of one shape and dtype "
                f"({start_signature(start)} vs {tensor_signature(end)})")
        joined = isinstance(start, JoinedStart)
        if not descends(start.join if joined else start, end):
            raise UnsupportedStructure(
                f"partition: {pair}: {(start.join if joined else start).name!r} is not an ancestor of {end.name!r}")
        if joined:
            values = join_parts(start.join)
            if values is None or len(values) != len(start.parts):
                raise UnsupportedStructure(
                    f"partition: {pair}: {start.join.name!r} is not a join of {len(start.parts)} tensor(s)")
            if start.join in partition.head:
                raise UnsupportedStructure(
                    f"partition: {pair}: the join {start.join.name!r} runs in the head, so the value at the span "
                    "start is made after it and needs no join")
            for part, value in zip(start.parts, values):
                if tensor_signature(part) != tensor_signature(value) or not descends(part, value):
                    raise UnsupportedStructure(
                        f"partition: {pair}: the joined start {part.name!r} does not stand for the join's input "
                        f"{value.name!r} (another shape or dtype, or not its ancestor)")
        for node in start_nodes(start):
            if node not in partition.head and node not in inputs:
                which = f"joined start {node.name!r}" if joined else "start"
                raise UnsupportedStructure(
                    f"partition: {pair}: the {which} is {_region(partition, node)}, not a head value or a graph input")
        if end not in partition.head and end not in partition.cached:
            raise UnsupportedStructure(
                f"partition: {pair}: the end is {_region(partition, end)}, not made before the blocks after the span")
        if end in seen:
            raise UnsupportedStructure(f"partition: {pair}: {end.name!r} is the end of two residual pairs")
        seen.add(end)


def _outputs(gm: fx.GraphModule) -> tuple[fx.Node, ...]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _signature(value):
    return ("node", tensor_signature(value)) if isinstance(value, fx.Node) else ("constant", id(value))


def _shown(values) -> str:
    return ", ".join(v.name if isinstance(v, fx.Node) else repr(v) for v in values) or "nothing"


def check_variants(gm: fx.GraphModule, partition, requirements, variants) -> None:
    """The graph variants' input and output counts (module docstring); raises
    :class:`UnsupportedStructure` naming the variant and its values."""
    n_inputs, n_exported = len(_placeholders(gm)), len(partition.exported)
    n_observed = len(partition.observed)
    part_outputs, pairs = partition.part_outputs, partition.pairs
    n_writes = len(part_outputs) + len(pairs) if requirements.reuses else 0
    if variants.num_cache_writes != n_writes:
        raise UnsupportedStructure(
            f"compute variant: {variants.num_cache_writes} cache write(s) for "
            f"{len(part_outputs)} part output(s) ({names(part_outputs)}) and {len(pairs)} residual pair(s) "
            f"(ends {names(e for _, e in pairs)})")
    expected = {
        "head": (n_inputs, int(variants.has_indicator) + n_exported,
                 f"indicator? ({int(variants.has_indicator)}) + {n_exported} exported"),
        "compute": (n_inputs + n_exported, variants.num_outputs + n_writes + n_observed,
                    f"{variants.num_outputs} output(s) + {n_writes} cache write(s) + {n_observed} observed"),
        "reuse": (n_inputs + n_exported + variants.num_cache_inputs, variants.num_outputs,
                  f"{variants.num_outputs} output(s)"),
    }
    for name, (n_placeholders, n_out, what) in expected.items():
        piece = getattr(variants, name)
        placeholders, outputs = _placeholders(piece), _outputs(piece)
        if len(placeholders) != n_placeholders:
            raise UnsupportedStructure(
                f"{name} variant: {len(placeholders)} placeholder(s) ({_shown(placeholders)}), expected "
                f"{n_placeholders}")
        if len(outputs) != n_out:
            raise UnsupportedStructure(
                f"{name} variant returns {len(outputs)} value(s) ({_shown(outputs)}), expected {what}")
    original = _outputs(gm)
    for name in ("compute", "reuse"):
        for i, (want, got) in enumerate(zip(original, _outputs(getattr(variants, name)))):
            if _signature(want) != _signature(got):
                raise UnsupportedStructure(
                    f"{name} variant: its output {i} ({_shown([got])}) does not stand for the graph's output {i} "
                    f"({_shown([want])}): {_signature(got)} vs {_signature(want)}")
