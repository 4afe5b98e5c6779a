"""Pass ``build_variants``: write the head graph and the compute / reuse graph variants.

All three take the original graph inputs first (same order as Dynamo's), then the exported head
values; the reuse variant then takes the cache-read placeholders its reconstruction declares.

* head:    original inputs -> (indicator?, *exported)   (``front_residual``: the indicator is a new
           ``sub`` node, the front blocks' output minus their input)
* compute: ... -> (*original outputs, *cache writes, *observed)   cache writes: ``stack``, the
           residual ``end - start`` per cached pair; ``block``, the predictable parts' outputs.
           Observed tensors go to the policy
* reuse:   ... , *cache -> (*original outputs)   ``stack``: the cached span's outputs are its inputs
           plus the predicted residuals, then the blocks after the span and the tail; ``block``: the
           span's blocks run with their parts' outputs replaced by predictions, and the nodes only
           those parts needed are removed (dead-code elimination)

Invariant: both variants return the original outputs in the original order; the compute variant's
extra outputs are exactly one cache write per cached pair (or feature), in that order, then the
observed tensors.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.structure import DenoiserStructure
from ..errors import UnsupportedStructure
from ..policies.base import Requirements
from .partition import Partition


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
        ph = graph.placeholder(f"head_{node.name}")
        ph.meta = dict(node.meta)
        env[node] = ph
    return graph, env


def _copy(graph: fx.Graph, env: dict, nodes) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])


def _copy_reachable(graph: fx.Graph, env: dict, nodes) -> None:
    """Copy the nodes whose inputs are all available; skip the rest, which only fed removed nodes
    (a part output nobody outside the parts needs, so it was not cached). Skipping a node with side
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


def build_variants(
    gm: fx.GraphModule, structure: DenoiserStructure, part: Partition, requirements: Requirements
) -> GraphVariants:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    original = _original_outputs(gm)

    # head
    graph = fx.Graph()
    env = {ph: graph.node_copy(ph) for ph in _placeholders(gm)}
    _copy(graph, env, [n for n in nodes if n in part.head])
    indicator = []
    if part.indicator is not None:
        indicator = [env[part.indicator]]
        if part.indicator_base is not None:
            indicator = [graph.call_function(torch.sub, (env[part.indicator], env[part.indicator_base]))]
            indicator[0].meta["example_value"] = part.indicator.meta.get("example_value")
    head_out = indicator + [env[n] for n in part.exported]
    head = _finish(gm, graph, tuple(head_out))

    # compute: the rest of the body and the tail, plus one residual per stream tensor (cache writes)
    graph, env = _start(gm, part.exported)
    _copy(graph, env, [n for n in nodes if n in part.rest])
    writes = []
    if requirements.reuses:
        writes = [env[n] for n in part.features]
        for start, end in part.pairs:
            r = graph.call_function(torch.sub, (env[end], env[start]))
            r.meta["example_value"] = end.meta.get("example_value")
            writes.append(r)
    outputs = tuple(fx.map_arg(original, lambda n: env[n]))
    observed = tuple(env[n] for n in part.observed)
    compute = _finish(gm, graph, outputs + tuple(writes) + observed)

    # reuse: cache reads and predictions instead of the cached work, then the tail
    graph, env = _start(gm, part.exported)
    first_cache_slot = len(graph.nodes)
    add_placeholder = placeholder_adder(graph)
    if part.features:
        predictions = requirements.reconstruction.predict(
            graph, [n.meta.get("example_value") for n in part.features], add_placeholder)
        env.update(zip(part.features, predictions))
        _copy_reachable(graph, env, [n for n in nodes if n in part.rest and n not in part.predicted])
    else:
        predictions = requirements.reconstruction.predict(
            graph, [start.meta.get("example_value") for start, _ in part.pairs], add_placeholder)
        for (start, end), prediction in zip(part.pairs, predictions):
            env[end] = graph.call_function(operator.add, (env[start], prediction))
            env[end].meta["example_value"] = start.meta.get("example_value")
        _copy(graph, env, [n for n in nodes if n in part.after])
    num_cache = len([n for n in graph.nodes if n.op == "placeholder"]) - first_cache_slot
    graph.output(tuple(fx.map_arg(original, lambda n: env[n])))
    graph.eliminate_dead_code()  # block: the norms and projections only the predicted parts read
    reuse = _finish(gm, graph, None)

    return GraphVariants(
        head=head, compute=compute, reuse=reuse, has_indicator=part.indicator is not None,
        num_exported=len(part.exported), num_outputs=len(original), num_cache_inputs=num_cache,
        num_cache_writes=len(writes),
    )
