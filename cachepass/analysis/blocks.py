"""Pass ``find_block_stack``: locate the repeated residual blocks of a denoiser graph.

Reads ``nn_module_stack`` only; never looks at attribute names such as ``blocks`` or
``transformer_blocks``, so any model whose blocks are children of a ``ModuleList`` (or ``Sequential``)
is found without an adapter.

A *stack* is a run of at least two consecutive blocks (in graph order) of the same class under the same
parent list, with consecutive indices. The *body* is the longest stack together with the stacks right
before and after it (FLUX: 19 double-stream blocks, then 38 single-stream blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import NoBlockStack
from .module_paths import ModuleRef, enclosing_list_child


@dataclass
class Block:
    module: ModuleRef
    nodes: list[fx.Node] = field(default_factory=list)


@dataclass
class BlockStack:
    parent: str
    class_name: str
    blocks: list[Block]

    @property
    def names(self) -> list[str]:
        return [b.module.qualified_name for b in self.blocks]


def blocks_in_graph_order(gm: fx.GraphModule) -> list[Block]:
    blocks: dict[str, Block] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        ref = enclosing_list_child(node)
        if ref is None:
            continue
        blocks.setdefault(ref.qualified_name, Block(ref)).nodes.append(node)
    return list(blocks.values())


def _runs(blocks: list[Block]) -> list[list[Block]]:
    runs: list[list[Block]] = []
    for block in blocks:
        prev = runs[-1][-1].module if runs else None
        if (
            prev is not None
            and prev.parent == block.module.parent
            and prev.class_name == block.module.class_name
            and block.module.index == prev.index + 1
        ):
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def find_block_stack(gm: fx.GraphModule) -> list[BlockStack]:
    """The consecutive stacks that form the body, in graph order. Raises if there is none."""
    runs = _runs(blocks_in_graph_order(gm))
    stacks = [i for i, run in enumerate(runs) if len(run) >= 2]
    if not stacks:
        raise NoBlockStack(
            "no block stack found: no run of two or more same-class blocks inside a ModuleList"
        )
    main = max(stacks, key=lambda i: (len(runs[i]), sum(len(b.nodes) for b in runs[i])))
    first = last = main
    while first - 1 in stacks:
        first -= 1
    while last + 1 in stacks:
        last += 1
    return [
        BlockStack(runs[i][0].module.parent, runs[i][0].module.class_name, runs[i])
        for i in range(first, last + 1)
    ]
