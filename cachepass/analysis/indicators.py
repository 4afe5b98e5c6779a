"""Pass ``find_indicators``: the tensors a policy may inspect before deciding to skip.

:data:`INDICATORS` is the one list of them (``cachepass.policies.base.INDICATORS`` and the feature names
``indicator:NAME`` of :mod:`cachepass.analysis.features` read it):

* ``timestep_embedding``: the body's timestep conditioning (content-independent; TeaCache for Wan).
* ``modulated_input``: the first node of block 0 that depends on both the residual stream and the
  timestep embedding, with the stream's shape (``norm1(x) * (1 + scale) + shift``; TeaCache for FLUX).
* ``first_block_output``: the first stream tensor leaving block 0.
* ``front_residual``: not found here but made by the partition pass (First-Block-Cache, DBCache): the
  stream after the ``compute_first`` front blocks minus its input, subtracted in the head graph.

Each found one is a node of the original graph; the partition pass moves its ancestors into the head graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from .residual_stream import StreamTensor
from .values import tensor_signature


@dataclass(frozen=True)
class Indicator:
    """One indicator a policy may decide on (``Requirements.indicator``).

    ``token_dependent``: it holds per-token values (sequence-parallel ranks each see their own shard,
    so a statistic of it must be summed over the ranks); the timestep embedding is the same on every
    rank. ``made_by_partition``: the partition pass makes it from the policy's ``compute_first`` blocks,
    so it exists only as a decision indicator, not as an observed feature."""

    name: str
    description: str
    token_dependent: bool = True
    made_by_partition: bool = False


#: Every indicator, by name, in the order :func:`find_indicators` looks for them.
INDICATORS: dict[str, Indicator] = {i.name: i for i in (
    Indicator("timestep_embedding", "the timestep conditioning the blocks read (content-independent)",
              token_dependent=False),
    Indicator("modulated_input", "block 0's first stream-shaped node reading the stream and the timestep "
              "embedding (norm1(x) * (1 + scale) + shift)"),
    Indicator("first_block_output", "the first stream tensor leaving block 0"),
    Indicator("front_residual", "the stream after the compute_first front blocks minus the stream entering "
              "block 0 (made by the partition)", made_by_partition=True),
)}


def find_indicators(g: nx.DiGraph, first_block: list[fx.Node], stream: list[StreamTensor],
                    embedding: fx.Node | None) -> dict[str, fx.Node]:
    """The indicators of :data:`INDICATORS` this graph has (those the analysis finds; not
    ``front_residual``), by name, in the registry's order."""
    found = {
        "timestep_embedding": embedding,
        "modulated_input": find_modulated_input(g, first_block, stream, embedding),
        "first_block_output": find_first_block_output(first_block, stream),
    }
    assert set(found) == {n for n, i in INDICATORS.items() if not i.made_by_partition}
    return {name: found[name] for name in INDICATORS if found.get(name) is not None}


def find_modulated_input(
    g: nx.DiGraph, first_block: list[fx.Node], stream: list[StreamTensor], embedding: fx.Node | None
) -> fx.Node | None:
    if embedding is None or not stream:
        return None
    stream_in = {i for s in stream for i in s.inputs}
    shapes = {tensor_signature(i) for i in stream_in}
    for node in first_block:  # graph order
        if tensor_signature(node) not in shapes:
            continue
        ancestors = nx.ancestors(g, node)
        if embedding in ancestors and ancestors & stream_in:
            return node
    return None


def find_first_block_output(first_block: list[fx.Node], stream: list[StreamTensor]) -> fx.Node | None:
    members = set(first_block)
    shapes = [tensor_signature(i) for s in stream for i in s.inputs]
    leaving = [n for n in first_block if any(u not in members for u in n.users)]
    for shape in shapes:
        for node in leaving:
            if tensor_signature(node) == shape:
                return node
    return None
