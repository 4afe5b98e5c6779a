"""Pass ``find_indicators``: the tensors a policy may inspect before deciding to skip.

* ``timestep_embedding``: the body's timestep conditioning (content-independent; TeaCache for Wan).
* ``modulated_input``: the first node of block 0 that depends on both the residual stream and the
  timestep embedding, with the stream's shape (``norm1(x) * (1 + scale) + shift``; TeaCache for FLUX).
* ``first_block_output``: the first stream tensor leaving block 0. (First-Block-Cache and DBCache read
  ``front_residual`` instead: the partition pass pairs the stream after the front blocks with its
  input and the head graph subtracts them.)

Each is a node of the original graph; the partition pass moves its ancestors into the head graph.
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .residual_stream import StreamTensor
from .values import tensor_signature


def find_modulated_input(
    g: nx.DiGraph, first_block: list[fx.Node], stream: list[StreamTensor], embedding: fx.Node | None
) -> fx.Node | None:
    if embedding is None or not stream:
        return None
    stream_in = {s.input for s in stream}
    shapes = {tensor_signature(s.input) for s in stream}
    for node in first_block:  # graph order
        if tensor_signature(node) not in shapes:
            continue
        ancestors = nx.ancestors(g, node)
        if embedding in ancestors and ancestors & stream_in:
            return node
    return None


def find_first_block_output(first_block: list[fx.Node], stream: list[StreamTensor]) -> fx.Node | None:
    members = set(first_block)
    shapes = [tensor_signature(s.input) for s in stream]
    leaving = [n for n in first_block if any(u not in members for u in n.users)]
    for shape in shapes:
        for node in leaving:
            if tensor_signature(node) == shape:
                return node
    return None
