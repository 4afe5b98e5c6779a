"""Pass ``find_residual_stream``: which tensors the block stack carries, and their in/out pairing.

Body inputs are values made outside the body and read inside it; body outputs are values made inside
and read after it. The residual stream is the body outputs, each paired with the body input of the same
shape and dtype that it descends from (``hidden_states`` in, ``hidden_states`` out). Side inputs such as
the timestep embedding, text states or rotary tables are body inputs without a partner.

Invariant: every body output has exactly one partner, otherwise the structure is unsupported (a
residual ``out - in`` would not be defined).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from ..errors import UnsupportedStructure
from .values import tensor_signature


@dataclass(frozen=True)
class StreamTensor:
    input: fx.Node
    output: fx.Node

    @property
    def shape(self) -> tuple[str, ...]:
        return tensor_signature(self.output)[0]


def body_inputs(body: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    found = {arg for n in body for arg in n.all_input_nodes if arg not in body}
    return sorted(found, key=order.__getitem__)


def body_outputs(body: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    found = {n for n in body if any(u not in body for u in n.users)}
    return sorted(found, key=order.__getitem__)


def find_residual_stream(
    g: nx.DiGraph, inputs: list[fx.Node], outputs: list[fx.Node], first_block: set[fx.Node]
) -> list[StreamTensor]:
    stream = []
    taken: set[fx.Node] = set()
    for out in outputs:
        signature = tensor_signature(out)
        if signature is None:
            raise UnsupportedStructure(f"body output {out.name!r} is not a tensor")
        ancestors = nx.ancestors(g, out)
        candidates = [i for i in inputs if i not in taken and i in ancestors and tensor_signature(i) == signature]
        if len(candidates) > 1:  # prefer what the first block reads: the stream enters there
            direct = [i for i in candidates if any(u in first_block for u in i.users)]
            candidates = direct or candidates
        if not candidates:
            raise UnsupportedStructure(
                f"body output {out.name!r} (shape [{', '.join(signature[0])}]) has no body input of the same "
                "shape and dtype to form a residual with"
            )
        taken.add(candidates[0])
        stream.append(StreamTensor(candidates[0], out))
    return stream
