"""The graphs of a block inside a stack split by graph breaks: their residual pairs, compute and reuse graphs.

When a graph break falls inside the loop over a block list, Dynamo skips the model's ``forward`` (a graph
break in a loop) and compiles every block's ``forward`` as a frame of its own, whose root module is the
block; a break inside a block splits that frame again (the graph up to the break, then resume functions).
Such a graph holds no list of blocks, so the stack analysis (:mod:`cachepass.analysis.blocks`) finds
nothing in it: its module is the block.

Its **residual pairs** are found by the skip connection, not by shape alone: a graph output is paired with
the caller input it reaches through additions only (and dtype casts: ``(x.float() + a * g).type_as(x)``),
of the same shape and dtype; one such input, not paired yet. The block's modulation (``linear(temb)``
chunks) or a normalised input (``norm(x) * (1 + s) + b``) reach no input that way, so they are not
paired and are recomputed on a reuse call. A graph that writes in place into one of its inputs has no
pairs (skipping it would skip the write).

* **compute**: the graph, then one residual ``out - in`` per pair (the cache writes);
* **reuse**: each paired output replaced by ``in + prediction`` (the reconstruction's cache reads, at
  granularity ``stack``), every other output computed from the inputs and those, then dead code
  eliminated: the attention and feed-forward that only fed the paired outputs are gone.

:mod:`cachepass.runtime.fragments` runs them, following the decision of the denoiser call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.dataflow import mutations_escaping, skip_sources
from ..analysis.values import example_value, is_user_input, tensor_signature
from ..errors import UnsupportedStructure
from ..policies.base import Requirements
from ..reconstruction import ADDED_PREFIX, check_cache_layout
from .variants import placeholder_adder


@dataclass(frozen=True)
class Pair:
    """A graph output (``output``: its position in the output tuple) that is a caller input (``input``: its
    placeholder position) plus a residual."""

    input: int
    output: int
    input_name: str
    output_name: str


@dataclass
class FragmentGraphs:
    compute: fx.GraphModule  # (*inputs) -> (*outputs, *residuals)
    reuse: fx.GraphModule  # (*inputs, *cache reads) -> (*outputs)
    pairs: list[Pair]
    num_outputs: int
    num_cache_writes: int


def _is_placeholder(node: fx.Node) -> bool:
    return node.op == "placeholder"


def _outputs(gm: fx.GraphModule) -> tuple:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def find_pairs(gm: fx.GraphModule) -> list[Pair]:
    """The residual pairs of a block graph (module docstring); none when it writes into an input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    body = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    if mutations_escaping(body):
        return []
    position = {p: i for i, p in enumerate(placeholders)}
    inputs = {p for p in placeholders if is_user_input(p) and tensor_signature(p) is not None}
    pairs: list[Pair] = []
    taken: set[fx.Node] = set()
    done: set[fx.Node] = set()
    for k, out in enumerate(_outputs(gm)):
        if not isinstance(out, fx.Node) or out.op == "placeholder" or out in done:
            continue
        signature = tensor_signature(out)
        if signature is None:
            continue
        sources = [p for p in skip_sources(out, _is_placeholder) if p in inputs and p not in taken and tensor_signature(p) == signature]
        if len(sources) != 1:
            continue
        taken.add(sources[0])
        done.add(out)
        pairs.append(Pair(position[sources[0]], k, sources[0].name, out.name))
    return pairs


def _finish(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    piece = fx.GraphModule(gm, graph)
    piece.meta.update(gm.meta)
    return piece


def build_fragment_graphs(gm: fx.GraphModule, pairs: list[Pair], requirements: Requirements) -> FragmentGraphs:
    """The compute and reuse graphs of a block graph with ``pairs``; the reconstruction must predict at
    granularity ``stack`` (:class:`UnsupportedStructure` otherwise)."""
    reconstruction = requirements.reconstruction
    if reconstruction.granularity != "stack":
        raise UnsupportedStructure(
            f"reconstruction {reconstruction.name!r} caches at granularity {reconstruction.granularity!r}; a graph "
            "holding part of a block of a split stack is cached at granularity 'stack' only")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    original = _outputs(gm)

    # compute: the graph, then out - in per pair
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = list(fx.map_arg(original, lambda n: env[n]))
    writes = []
    for pair in pairs:
        out, start = env[original[pair.output]], env[placeholders[pair.input]]
        r = graph.call_function(torch.sub, (out, start), name=f"{ADDED_PREFIX}residual_{pair.output_name}")
        r.meta["example_value"] = example_value(original[pair.output])
        writes.append(r)
    graph.output(tuple(outputs) + tuple(writes))
    compute = _finish(gm, graph)

    # reuse: in + prediction for each paired output, the rest recomputed from those
    graph = fx.Graph()
    env = {p: graph.node_copy(p) for p in placeholders}
    add_placeholder = placeholder_adder(graph)
    predictions = list(reconstruction.predict(graph, [example_value(original[p.output]) for p in pairs],
                                              add_placeholder))
    if len(predictions) != len(pairs):
        raise UnsupportedStructure(f"reconstruction {reconstruction.name!r}: predict returned {len(predictions)} "
                                   f"prediction(s) for {len(pairs)} residual(s)")
    cache_placeholders = [n for n in graph.nodes if n.op == "placeholder"][len(placeholders):]
    replaced = {}
    for pair, prediction in zip(pairs, predictions):
        node = graph.call_function(operator.add, (env[placeholders[pair.input]], prediction),
                                   name=f"{ADDED_PREFIX}reuse_{pair.output_name}")
        node.meta["example_value"] = example_value(original[pair.output])
        replaced[original[pair.output]] = node
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node in replaced:
            continue
        env[node] = graph.node_copy(node, lambda n: replaced.get(n, env.get(n)))
    env.update(replaced)
    graph.output(tuple(fx.map_arg(original, lambda n: env[n])))
    graph.eliminate_dead_code()
    reuse = _finish(gm, graph)
    check_cache_layout(reconstruction, [n for n in compute.graph.nodes if n.name.startswith(f"{ADDED_PREFIX}residual_")],
                       cache_placeholders)
    return FragmentGraphs(compute, reuse, pairs, len(original), len(writes))
