"""Pass ``find_residual_stream``: which tensors the block stack carries, and their in/out pairing.

Body inputs are values made outside the body and read inside it; body outputs are values made inside
and read after it. The residual stream is the body outputs, each paired with the body input of the same
shape and dtype that it descends from (``hidden_states`` in, ``hidden_states`` out). Side inputs such as
the timestep embedding, text states or rotary tables are body inputs without a partner.

**Joined streams.** Some models concatenate stream tensors between two stacks (Chroma, Flux2, AuraFlow:
text and image tokens ``cat`` along the token axis after the double-stream blocks, before the
single-stream ones), so the body's output (text + image tokens) has no input of its shape. Its partner
is then the same join applied to the body's inputs: a *join* is a concatenation in the body, outside
every block, with the output's shape and dtype, that the output descends from and whose tensor inputs
each pair (as above) with a body input; the stream tensor records the join and those inputs
(:attr:`StreamTensor.joined`), and its residual is ``out - cat(joined inputs)`` (the partition pass
re-derives the partner at its own span start, :mod:`cachepass.transform.partition`).

Invariant: every body output has exactly one partner, a body input or a join of body inputs, otherwise
the structure is unsupported (a residual ``out - in`` would not be defined).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from ..errors import UnsupportedStructure
from .dataflow import skip_sources
from .values import tensor_signature

#: The concatenations a join can be.
JOIN_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


@dataclass(frozen=True)
class StreamTensor:
    """One stream tensor: a body input and the body output it becomes. A joined one (``join`` set) has
    as partner the ``join`` applied to ``joined`` (body inputs, in the join's order); its ``input`` is
    the first of them, and :attr:`inputs` all of them."""

    input: fx.Node
    output: fx.Node
    join: fx.Node | None = None  # a joined stream: the concatenation in the body it passes through
    joined: tuple[fx.Node, ...] = ()  # the body inputs standing for the join's tensor inputs, in order

    @property
    def shape(self) -> tuple[str, ...]:
        return tensor_signature(self.output)[0]

    @property
    def inputs(self) -> tuple[fx.Node, ...]:
        """The body inputs this stream tensor starts from: ``(input,)``, or the joined inputs."""
        return self.joined or (self.input,)

    @property
    def start_name(self) -> str:
        """``hidden_states``, or for a joined stream ``cat(encoder_hidden_states, hidden_states)``."""
        return join_name(self.inputs) if self.join is not None else self.input.name


def join_name(parts) -> str:
    """How a join of ``parts`` (nodes) is written in messages and dumps: ``cat(a, b)``."""
    return f"cat({', '.join(p.name for p in parts)})"


def join_parts(node: fx.Node) -> list[fx.Node] | None:
    """The tensor inputs of ``node``, in order, when it is a concatenation of graph values; else ``None``."""
    if node.op != "call_function" or node.target not in JOIN_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None
    if not all(isinstance(t, fx.Node) and tensor_signature(t) is not None for t in tensors):
        return None
    return list(tensors)


def body_inputs(body: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    found = {arg for n in body for arg in n.all_input_nodes if arg not in body}
    return sorted(found, key=order.__getitem__)


def body_outputs(body: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    found = {n for n in body if any(u not in body for u in n.users)}
    return sorted(found, key=order.__getitem__)


def _partner(g: nx.DiGraph, inputs: list[fx.Node], value: fx.Node, taken: set[fx.Node],
             first_block: set[fx.Node]) -> fx.Node | None:
    """The body input ``value`` pairs with: same shape and dtype, ``value`` itself or an ancestor, not
    taken; among several, the one ``value`` reaches through the skip connections (additions and casts
    only: a rotary table of the tokens' shape that every attention reads is an ancestor too, but not on
    the skip path), else one the first block reads (the stream enters there)."""
    signature = tensor_signature(value)
    ancestors = nx.ancestors(g, value) | {value}
    candidates = [i for i in inputs if i not in taken and i in ancestors and tensor_signature(i) == signature]
    if len(candidates) > 1:
        on_skip = skip_sources(value, set(candidates).__contains__)
        candidates = [i for i in candidates if i in on_skip] or candidates
    if len(candidates) > 1:
        direct = [i for i in candidates if any(u in first_block for u in i.users)]
        candidates = direct or candidates
    return candidates[0] if candidates else None


def _joined(g: nx.DiGraph, inputs: list[fx.Node], out: fx.Node, taken: set[fx.Node], first_block: set[fx.Node],
            body: set[fx.Node], block_nodes: set[fx.Node]) -> StreamTensor | None:
    """``out`` as a joined stream tensor: the first join (graph order) of body inputs it descends from."""
    signature = tensor_signature(out)
    ancestors = nx.ancestors(g, out) | {out}
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    joins = sorted((n for n in ancestors if n in body and n not in block_nodes and tensor_signature(n) == signature
                    and join_parts(n) is not None), key=order.__getitem__)
    for join in joins:
        chosen: list[fx.Node] = []
        for part in join_parts(join):
            partner = _partner(g, inputs, part, taken | set(chosen), first_block)
            if partner is None:
                break
            chosen.append(partner)
        else:
            return StreamTensor(chosen[0], out, join=join, joined=tuple(chosen))
    return None


def find_residual_stream(
    g: nx.DiGraph, inputs: list[fx.Node], outputs: list[fx.Node], first_block: set[fx.Node],
    body: set[fx.Node] | None = None, block_nodes: set[fx.Node] | None = None,
) -> list[StreamTensor]:
    """Pair each body output with its body input (graph order); the outputs left without one are then
    paired through a join (module docstring), when ``body`` and ``block_nodes`` are given."""
    paired: dict[fx.Node, StreamTensor] = {}
    taken: set[fx.Node] = set()
    unpaired: list[fx.Node] = []

    def join_unpaired() -> None:  # in graph order, so the first output without a partner is the one named
        for out in unpaired:
            joined = None
            if body is not None and block_nodes is not None:
                joined = _joined(g, inputs, out, taken, first_block, body, block_nodes)
            if joined is None:
                signature = tensor_signature(out)
                raise UnsupportedStructure(
                    f"body output {out.name!r} (shape [{', '.join(signature[0])}]) has no body input of the same "
                    "shape and dtype to form a residual with"
                )
            taken.update(joined.joined)
            paired[out] = joined
        unpaired.clear()

    for out in outputs:
        if tensor_signature(out) is None:
            join_unpaired()
            raise UnsupportedStructure(f"body output {out.name!r} is not a tensor")
        partner = _partner(g, inputs, out, taken, first_block)
        if partner is None:
            unpaired.append(out)
            continue
        taken.add(partner)
        paired[out] = StreamTensor(partner, out)
    join_unpaired()
    return [paired[out] for out in outputs]
