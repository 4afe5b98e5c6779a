"""The analysis pipeline: read-only passes that turn a Dynamo graph into a :class:`DenoiserStructure`.

Order (each pass reads what the previous ones found, none changes the graph):

1. ``find_block_stack``  - the repeated blocks (``blocks.py``)
2. ``split_regions``     - prologue / body / epilogue node sets, hoisting body-range nodes that do not
                           need the blocks into the prologue
3. ``check_body``        - the body is convex and writes into nothing made outside it
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
from .blocks import BlockStack
from .dataflow import alias_root, convexity_violation, mutations_escaping
from .residual_stream import StreamTensor
from .unet import UNetCut

log = get_logger(__name__)


@dataclass
class DenoiserStructure:
    """Everything the transform passes and ``explain`` need to know about one graph."""

    gm: fx.GraphModule
    stacks: list[BlockStack]
    prologue: set[fx.Node]  # before the block stack (the partition's head starts from it)
    body: set[fx.Node]  # the block stack's range
    epilogue: set[fx.Node]  # after the block stack
    stream: list[StreamTensor]
    side_inputs: list[fx.Node]
    timestep_input: fx.Node | None
    indicators: dict[str, fx.Node] = field(default_factory=dict)
    dataflow: nx.DiGraph | None = None
    unet: UNetCut | None = None  # a U-Net: no stacks, no stream; its deep feature is cached as a value

    @property
    def deep_feature(self) -> fx.Node | None:
        """A U-Net's cached value (``analysis/unet.py``); ``None`` for a block stack."""
        return self.unet.deep_feature if self.unet is not None else None

    @property
    def blocks(self):
        return [b for s in self.stacks for b in s.blocks]

    @property
    def joins(self) -> list[fx.Node]:
        """The joins of the joined stream tensors (``cat`` nodes in the body, outside the blocks), graph order."""
        order = self.order
        return sorted({s.join for s in self.stream if s.join is not None}, key=order.__getitem__)

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

        Boundary 0 is the body's stream inputs (a joined stream tensor's every joined input); ``len(blocks)``
        its stream outputs; in between, every body value made before block ``k`` and read from block ``k`` on.
        """
        if k == 0:
            return [i for s in self.stream for i in s.inputs]
        if k == len(self.blocks):
            return [s.output for s in self.stream]
        order, pos = self.order, self.boundary_position(k)
        crossing = [n for n in self.body if order[n] < pos and any(order[u] >= pos for u in n.users)]
        return sorted(crossing, key=order.__getitem__)


def split_regions(gm: fx.GraphModule, stacks: list[BlockStack]) -> tuple[set, set, set]:
    """Prologue: before the first block; epilogue: after the last; body: the range between them.

    A node in the range that belongs to no block and depends on no body node (an embedding computed
    lazily between blocks, say) is hoisted into the prologue, so the body holds only block work.
    """
    block_nodes = {n for s in stacks for b in s.blocks for n in b.nodes}
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    positions = [i for i, n in enumerate(nodes) if n in block_nodes]
    first, last = positions[0], positions[-1]
    prologue = set(nodes[:first])
    epilogue = set(nodes[last + 1:])
    body: set[fx.Node] = set()
    for n in nodes[first:last + 1]:
        if n not in block_nodes and not any(a in body for a in n.all_input_nodes):
            prologue.add(n)
        else:
            body.add(n)
    return prologue, body, epilogue


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


def check_body(g: nx.DiGraph, body: set[fx.Node]) -> None:
    """The body invariants: it is convex (no path leaves it and comes back) and writes in place into
    nothing made outside it. Raises :class:`UnsupportedStructure` naming the nodes."""
    violation = convexity_violation(g, body)
    if violation is not None:
        left, outside, back = violation
        raise UnsupportedStructure(
            "the block stack is not a convex region: a value leaves it and comes back "
            f"({left.name!r} is read by {outside.name!r} outside the blocks, which leads back into them at "
            f"{back.name!r})"
        )
    escaping = mutations_escaping(body)
    if escaping:
        order = {n: i for i, n in enumerate(escaping[0].graph.nodes)}
        escaping.sort(key=order.__getitem__)
        targets = ", ".join(f"{n.name!r} into {alias_root(n.args[0]).name!r}" for n in escaping[:3])
        raise UnsupportedStructure(
            "the block stack writes in place into tensors made outside it "
            f"({targets}{f' and {len(escaping) - 3} more' if len(escaping) > 3 else ''}); skipping it "
            "would change those tensors"
        )


def analyse(gm: fx.GraphModule, root=None) -> DenoiserStructure:
    """Run the analysis passes on ``gm``. ``root`` (the original module, when known) lets the pass
    check that the graph holds the whole block list (a graph break would split it).

    The passes run as the stages ``cachepass.stages.ANALYSIS`` (one runner for the backend, ``explain``
    and calibration); each stage calls one function of this package (``check_body``, ``find_indicators``,
    ...): change a pass there."""
    from ..stages import analyse_graph

    return analyse_graph(gm, root).structure
