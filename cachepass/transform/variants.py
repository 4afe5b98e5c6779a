"""Pass ``build_variants``: write the head graph and the compute / reuse graph variants.

All three take the original graph inputs first (same order as Dynamo's), then the exported head
values; the reuse variant then takes the cache-read placeholders its reconstruction declares.

* head:    original inputs -> (indicator?, *exported)   (``front_residual``: the indicator is a new
           ``sub`` node, the front blocks' output minus their input)
* compute: ... -> (*original outputs, *cache writes, *observed)   cache writes: ``stack``, the
           residual ``end - start`` per cached pair (a value pair, a U-Net's deep feature: ``end``
           itself); ``block``, the predictable parts' outputs.
           Observed tensors go to the policy
* reuse:   ... , *cache -> (*original outputs)   ``stack``: the cached span's outputs are its inputs
           plus the predicted residuals (a value pair's: the prediction), then the blocks after the span
           and the epilogue; ``block``: the
           span's blocks run with their parts' outputs replaced by predictions, and the nodes only
           those parts needed are removed (dead-code elimination)

Node names: a copied node keeps its name in the original graph; every node this pass adds is named
``cp_...`` (:data:`~cachepass.reconstruction.ADDED_PREFIX`, as are the reconstruction's placeholders and
predictions): ``cp_head_NAME`` (the placeholder of the exported head value ``NAME``),
``cp_front_residual`` (the head's ``front_residual`` indicator), ``cp_residual_END`` (a ``stack`` cache
write, ``END - start``), ``cp_reuse_END`` (the reuse variant's ``start + prediction`` standing for
``END``) and ``cp_join_END`` (a joined start: the stream's join applied to the partners at the span
start, in the compute and reuse variants, or in the head for the ``front_residual`` base standing for
``END`` = the indicator), so a graph dump never shows an added node under an original node's name.

Invariant: both variants return the original outputs in the original order; the compute variant's
extra outputs are exactly one cache write per cached pair (or block part output), in that order, then
the observed tensors. Checked here, once per graph (:mod:`cachepass.transform.invariants`): the partition
before the graphs are written, their input and output counts after, the reconstruction's predictions
(one per cached tensor) and its cache layout (:func:`~cachepass.reconstruction.check_cache_layout`).
A value a variant would read without having it raises :class:`UnsupportedStructure` naming the node
and its reader, not a ``KeyError``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.structure import DenoiserStructure
from ..errors import UnsupportedStructure
from ..policies.base import Requirements
from ..reconstruction import ADDED_PREFIX, check_cache_layout
from .invariants import check_partition, check_variants
from .partition import JoinedStart, Partition, ValueStart


@dataclass
class GraphVariants:
    head: fx.GraphModule
    compute: fx.GraphModule
    reuse: fx.GraphModule
    has_indicator: bool
    num_exported: int
    num_outputs: int
    num_cache_inputs: int
    num_cache_writes: int


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _start(gm: fx.GraphModule, exported: list[fx.Node]) -> tuple[fx.Graph, dict]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for ph in _placeholders(gm):
        env[ph] = graph.node_copy(ph)
    for node in exported:
        ph = graph.placeholder(f"{ADDED_PREFIX}head_{node.name}")
        ph.meta = dict(node.meta)
        env[node] = ph
    return graph, env


def _get(env: dict, value: fx.Node, reader: str, variant: str) -> fx.Node:
    """``env[value]``, or :class:`UnsupportedStructure` naming what is missing in which variant."""
    try:
        return env[value]
    except KeyError:
        raise UnsupportedStructure(
            f"{variant} variant: {reader} reads {value.name!r}, which that variant neither computes nor "
            "receives (a partition invariant is broken)") from None


def _start_value(graph: fx.Graph, env: dict, start, end: fx.Node, reader: str, variant: str) -> fx.Node:
    """The value of a residual pair's ``start`` (or the indicator base) standing for ``end``'s partner:
    ``env[start]``, or for a :class:`JoinedStart` a new node ``cp_join_END``: its join applied to its
    parts instead of the join's own inputs."""
    if not isinstance(start, JoinedStart):
        return _get(env, start, reader, variant)
    join = start.join
    parts = [_get(env, p, reader, variant) for p in start.parts]

    def replace(n):  # another node argument (dim as a SymInt)
        return _get(env, n, reader, variant)

    if join.args:
        args, kwargs = (parts, *fx.map_arg(join.args[1:], replace)), fx.map_arg(join.kwargs, replace)
    else:
        args, kwargs = (), {**fx.map_arg(join.kwargs, replace), "tensors": parts}
    node = graph.call_function(join.target, tuple(args), dict(kwargs), name=f"{ADDED_PREFIX}join_{end.name}")
    node.meta["example_value"] = join.meta.get("example_value")
    return node


def _copy(graph: fx.Graph, env: dict, nodes, variant: str) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n, node=node: _get(env, n, repr(node.name), variant))


def _map_outputs(original: tuple, env: dict, variant: str) -> tuple:
    return tuple(fx.map_arg(original, lambda n: _get(env, n, "the graph output", variant)))


def _copy_reachable(graph: fx.Graph, env: dict, nodes) -> None:
    """Copy the nodes whose inputs are all available; skip the rest, which only fed removed nodes
    (a block part output nobody outside the parts needs, so it was not cached). Skipping a node with side
    effects would change the result, so that is refused."""
    for node in nodes:
        if all(n in env for n in node.all_input_nodes):
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif node.is_impure():
            raise UnsupportedStructure(
                f"granularity 'block': {node.name!r} has side effects but reads a predicted part's "
                "internals; use granularity='stack'"
            )


def _original_outputs(gm: fx.GraphModule) -> tuple:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _finish(gm: fx.GraphModule, graph: fx.Graph, outputs: tuple | None) -> fx.GraphModule:
    """Close ``graph`` with ``outputs`` (``None``: it already has its output node) and wrap it."""
    if outputs is not None:
        graph.output(outputs)
    graph.lint()
    piece = fx.GraphModule(gm, graph)
    piece.meta.update(gm.meta)
    return piece


def placeholder_adder(graph: fx.Graph):
    """``add(name, example)``: a new placeholder kept before every other node (the inputs stay first)."""

    def add(name, example):
        anchor = next((n for n in graph.nodes if n.op != "placeholder"), None)
        if anchor is None:
            ph = graph.placeholder(name)
        else:
            with graph.inserting_before(anchor):
                ph = graph.placeholder(name)
        ph.meta["example_value"] = example
        return ph

    return add


def _predict(requirements: Requirements, graph: fx.Graph, cached: list[fx.Node], add_placeholder) -> list:
    """The reconstruction's prediction nodes, one per cached tensor (``cached``: the nodes whose
    example values it predicts, in cache-write order), checked."""
    reconstruction = requirements.reconstruction
    predictions = list(reconstruction.predict(graph, [n.meta.get("example_value") for n in cached],
                                              add_placeholder))
    name = getattr(reconstruction, "name", type(reconstruction).__name__)
    if len(predictions) != len(cached):
        raise UnsupportedStructure(
            f"reconstruction {name!r}: predict returned {len(predictions)} prediction(s) for the "
            f"{len(cached)} cached tensor(s) {', '.join(repr(n.name) for n in cached) or 'none'}")
    for node, prediction in zip(cached, predictions):
        if not isinstance(prediction, fx.Node) or prediction.graph is not graph:
            raise UnsupportedStructure(
                f"reconstruction {name!r}: its prediction of {node.name!r} is not a node of the reuse graph "
                f"({prediction!r})")
    return predictions


def build_variants(
    gm: fx.GraphModule, structure: DenoiserStructure, partition: Partition, requirements: Requirements
) -> GraphVariants:
    check_partition(structure, partition)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    original = _original_outputs(gm)

    # head
    graph = fx.Graph()
    env = {ph: graph.node_copy(ph) for ph in _placeholders(gm)}
    _copy(graph, env, [n for n in nodes if n in partition.head], "head")
    indicator = []
    if partition.indicator is not None:
        indicator = [_get(env, partition.indicator, "the indicator", "head")]
        if partition.indicator_base is not None:
            base = _start_value(graph, env, partition.indicator_base, partition.indicator, "the indicator base",
                                "head")
            name = f"{ADDED_PREFIX}front_residual"
            indicator = [graph.call_function(torch.sub, (indicator[0], base), name=name)]
            indicator[0].meta["example_value"] = partition.indicator.meta.get("example_value")
    head_out = indicator + [_get(env, n, "the head's exports", "head") for n in partition.exported]
    head = _finish(gm, graph, tuple(head_out))

    # compute: the rest of the body and the epilogue, plus one residual per stream tensor (cache writes)
    graph, env = _start(gm, partition.exported)
    _copy(graph, env, [n for n in nodes if n in partition.rest], "compute")
    writes = []
    if requirements.reuses:
        writes = [_get(env, n, "a cache write", "compute") for n in partition.part_outputs]
        for start, end in partition.pairs:
            if isinstance(start, ValueStart):  # the value itself
                writes.append(_get(env, end, "a cache write", "compute"))
                continue
            residual = (_get(env, end, "a cache write", "compute"),
                        _start_value(graph, env, start, end, "a cache write", "compute"))
            r = graph.call_function(torch.sub, residual, name=f"{ADDED_PREFIX}residual_{end.name}")
            r.meta["example_value"] = end.meta.get("example_value")
            writes.append(r)
    outputs = _map_outputs(original, env, "compute")
    observed = tuple(_get(env, n, "an observed tensor", "compute") for n in partition.observed)
    compute = _finish(gm, graph, outputs + tuple(writes) + observed)

    # reuse: cache reads and predictions instead of the cached work, then the epilogue
    graph, env = _start(gm, partition.exported)
    first_cache_slot = len(graph.nodes)
    add_placeholder = placeholder_adder(graph)
    if partition.part_outputs:
        predictions = _predict(requirements, graph, partition.part_outputs, add_placeholder)
        env.update(zip(partition.part_outputs, predictions))
        _copy_reachable(graph, env, [n for n in nodes if n in partition.rest and n not in partition.predicted])
    else:
        predicted = [end if isinstance(start, (JoinedStart, ValueStart)) else start for start, end in partition.pairs]
        predictions = _predict(requirements, graph, predicted, add_placeholder)
        for (start, end), prediction in zip(partition.pairs, predictions):
            if isinstance(start, ValueStart):  # the value is the prediction
                env[end] = prediction
                continue
            start_value = _start_value(graph, env, start, end, "a prediction", "reuse")
            name = f"{ADDED_PREFIX}reuse_{end.name}"
            env[end] = graph.call_function(operator.add, (start_value, prediction), name=name)
            env[end].meta["example_value"] = start_value.meta.get("example_value")
        _copy(graph, env, [n for n in nodes if n in partition.after], "reuse")
    cache_placeholders = [n for n in graph.nodes if n.op == "placeholder"][first_cache_slot:]
    if requirements.reuses:
        check_cache_layout(requirements.reconstruction, writes, cache_placeholders)
    graph.output(_map_outputs(original, env, "reuse"))
    graph.eliminate_dead_code()  # block: the norms and projections only the predicted parts read
    reuse = _finish(gm, graph, None)

    variants = GraphVariants(
        head=head, compute=compute, reuse=reuse, has_indicator=partition.indicator is not None,
        num_exported=len(partition.exported), num_outputs=len(original), num_cache_inputs=len(cache_placeholders),
        num_cache_writes=len(writes),
    )
    check_variants(gm, partition, requirements, variants)
    return variants
