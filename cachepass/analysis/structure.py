"""The analysis pipeline: read-only passes that turn a Dynamo graph into a :class:`DenoiserStructure`.

Order (each pass reads what the previous ones found, none changes the graph):

1. ``find_block_stack``  - the repeated blocks (``blocks.py``)
2. ``split_regions``     - head / body / tail node sets, hoisting body-range nodes that do not need
                           the blocks into the head
3. checks               - the body is convex and writes into nothing made outside it
4. ``find_residual_stream`` - stream tensors and their in/out pairing (``residual_stream.py``)
5. ``find_timestep``     - timestep input and embedding (``timestep.py``)
6. ``find_indicators``   - modulated input, first block output (``indicators.py``)

Any failure raises :class:`~cachepass.errors.UnsupportedStructure` with a reason the user can act on;
the backend then falls back to the unchanged graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from .._logging import get_logger
from ..errors import SplitStack, UnsupportedStructure
from .blocks import BlockStack, find_block_stack
from .dataflow import is_convex, mutations_escaping, to_networkx
from .indicators import find_first_block_output, find_modulated_input
from .residual_stream import StreamTensor, body_inputs, body_outputs, find_residual_stream
from .timestep import find_timestep_embedding, find_timestep_input

log = get_logger(__name__)


@dataclass
class DenoiserStructure:
    """Everything the transform passes and ``explain`` need to know about one graph."""

    gm: fx.GraphModule
    stacks: list[BlockStack]
    head: set[fx.Node]
    body: set[fx.Node]
    tail: set[fx.Node]
    stream: list[StreamTensor]
    side_inputs: list[fx.Node]
    timestep_input: fx.Node | None
    indicators: dict[str, fx.Node] = field(default_factory=dict)
    dataflow: nx.DiGraph | None = None

    @property
    def blocks(self):
        return [b for s in self.stacks for b in s.blocks]

    @property
    def order(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.gm.graph.nodes)}

    def boundary_position(self, k: int) -> int:
        """Graph-order position where block ``k`` starts (``len(blocks)``: just after the body)."""
        order = self.order
        if k < len(self.blocks):
            return min(order[n] for n in self.blocks[k].nodes)
        return max(order[n] for n in self.body) + 1

    def boundary_values(self, k: int) -> list[fx.Node]:
        """The values crossing the boundary before block ``k``: the stream at that point.

        Boundary 0 is the body's stream inputs; ``len(blocks)`` its stream outputs; in between, every
        body value made before block ``k`` and read from block ``k`` on.
        """
        if k == 0:
            return [s.input for s in self.stream]
        if k == len(self.blocks):
            return [s.output for s in self.stream]
        order, pos = self.order, self.boundary_position(k)
        crossing = [n for n in self.body if order[n] < pos and any(order[u] >= pos for u in n.users)]
        return sorted(crossing, key=order.__getitem__)


def split_regions(gm: fx.GraphModule, stacks: list[BlockStack]) -> tuple[set, set, set]:
    """Head: before the first block; tail: after the last; body: the range between them.

    A node in the range that belongs to no block and depends on no body node (an embedding computed
    lazily between blocks, say) is hoisted into the head, so the body holds only block work.
    """
    block_nodes = {n for s in stacks for b in s.blocks for n in b.nodes}
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    positions = [i for i, n in enumerate(nodes) if n in block_nodes]
    first, last = positions[0], positions[-1]
    head = set(nodes[:first])
    tail = set(nodes[last + 1:])
    body: set[fx.Node] = set()
    for n in nodes[first:last + 1]:
        if n not in block_nodes and not any(a in body for a in n.all_input_nodes):
            head.add(n)
        else:
            body.add(n)
    return head, body, tail


def _check_whole(root, parent: str, indices: list) -> None:
    """Raise :class:`SplitStack` when the graph holds only some blocks of ``root``'s list ``parent``."""
    try:
        expected = len(root.get_submodule(parent))
    except Exception:  # not a list of the root (or no len): nothing to compare
        return
    if expected >= 2 and len(indices) < expected:
        shown = ", ".join(str(i) for i in indices[:8]) + (", ..." if len(indices) > 8 else "")
        raise SplitStack(
            f"a graph break splits the block stack {parent!r} ({expected} blocks) over several graphs; this "
            f"one holds block(s) {shown}. Each fragment runs uncached: remove the break (run with "
            f"fullgraph=True, or TORCH_LOGS=graph_breaks, to see where it is)", parent)


def analyse(gm: fx.GraphModule, root=None) -> DenoiserStructure:
    """Run the analysis passes on ``gm``. ``root`` (the original module, when known) lets the pass
    check that the graph holds the whole block list (a graph break would split it)."""
    stacks = find_block_stack(gm)
    if root is not None:
        for stack in stacks:
            _check_whole(root, stack.parent, [b.module.index for b in stack.blocks])
    head, body, tail = split_regions(gm, stacks)
    g = to_networkx(gm.graph)
    if not is_convex(g, body):
        raise UnsupportedStructure("the block stack is not a convex region: a value leaves it and comes back")
    escaping = mutations_escaping(body)
    if escaping:
        raise UnsupportedStructure(
            "the block stack writes in place into tensors made outside it "
            f"({', '.join(n.name for n in escaping[:3])}); skipping it would change those tensors"
        )
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inputs, outputs = body_inputs(body, order), body_outputs(body, order)
    first_block = [n for n in stacks[0].blocks[0].nodes if n in body]
    stream = find_residual_stream(g, inputs, outputs, set(first_block))
    stream_inputs = {s.input for s in stream}
    side_inputs = [i for i in inputs if i not in stream_inputs]
    stream_sources = set().union(*(nx.ancestors(g, s.input) | {s.input} for s in stream))

    timestep = find_timestep_input(gm, g)
    embedding = find_timestep_embedding(g, timestep, side_inputs, stream_sources)
    indicators: dict[str, fx.Node] = {}
    if embedding is not None:
        indicators["timestep_embedding"] = embedding
    modulated = find_modulated_input(g, first_block, stream, embedding)
    if modulated is not None:
        indicators["modulated_input"] = modulated
    first_out = find_first_block_output(first_block, stream)
    if first_out is not None:
        indicators["first_block_output"] = first_out

    structure = DenoiserStructure(
        gm=gm, stacks=stacks, head=head, body=body, tail=tail, stream=stream, side_inputs=side_inputs,
        timestep_input=timestep, indicators=indicators, dataflow=g,
    )
    log.debug(
        "analysed graph: %d blocks in %d stack(s), %d stream tensor(s), timestep input %s, indicators %s",
        len(structure.blocks), len(stacks), len(stream), timestep and timestep.name, sorted(indicators),
    )
    return structure
