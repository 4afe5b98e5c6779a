"""Pass ``find_block_stack``: locate the repeated residual blocks of a denoiser graph.

Reads ``nn_module_stack`` only; never looks at attribute names such as ``blocks`` or
``transformer_blocks``, so any model whose blocks are children of a ``ModuleList`` (or ``Sequential``)
is found without an adapter.

A *stack* is a run of at least two consecutive blocks (in graph order) of the same class under the same
parent list, with consecutive indices. The *body* is the longest stack together with the stacks right
before and after it (FLUX: 19 double-stream blocks, then 38 single-stream blocks).

Modules of *other* lists may run between two consecutive blocks of the longest stack (ConsisID: a face
cross-attention of ``perceiver_cross_attention`` after every other block): the stack then goes on across
them to its list's next block, and they are part of the body (their work is in the stack's residual).
When no list has two blocks in a row, two lists whose blocks alternate (Latte: a spatial block, then a
temporal one, each of its own list) form the stack the same way, on the list that spans the most.
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


def stack_size(blocks: list[Block]) -> tuple[int, int]:
    """How a run of blocks ranks against another: its block count, then its node count (the longest stack)."""
    return len(blocks), sum(len(b.nodes) for b in blocks)


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


def _continues(run: list[Block], block: Block, step: int) -> bool:
    """Whether ``block`` is the block of ``run``'s list right after (``step`` 1) or before (-1) it."""
    end = run[-1] if step > 0 else run[0]
    return (block.module.parent == end.module.parent and block.module.class_name == end.module.class_name
            and block.module.index == end.module.index + step)


def _across_other_lists(runs: list[list[Block]], main: int) -> tuple[list[list[Block]], int]:
    """``runs`` with the ``main`` run joined to the runs of its own list that continue it across runs of
    other lists only (their modules run between its blocks), and the joined run's new position."""
    parent = runs[main][0].module.parent
    run, first, last = list(runs[main]), main, main
    for step in (1, -1):
        k = main + step
        while 0 <= k < len(runs) and runs[k][0].module.parent != parent:
            k += step
        while 0 <= k < len(runs) and _continues(run, runs[k][-1 if step < 0 else 0], step):
            run = run + runs[k] if step > 0 else runs[k] + run
            if step > 0:
                last = k
            else:
                first = k
            k += step
            while 0 <= k < len(runs) and runs[k][0].module.parent != parent:
                k += step
    if first == last:
        return runs, main
    inside = [r for r in runs[first:last + 1] if r[0].module.parent != parent]
    if not inside:  # nothing ran between: the runs were already one
        return runs, main
    return runs[:first] + [run] + runs[last + 1:], first


def find_block_stack(gm: fx.GraphModule) -> list[BlockStack]:
    """The consecutive stacks that form the body, in graph order. Raises if there is none."""
    runs = _runs(blocks_in_graph_order(gm))
    stacks = [i for i, run in enumerate(runs) if len(run) >= 2]
    if stacks:
        main = max(stacks, key=lambda i: stack_size(runs[i]))
        runs, main = _across_other_lists(runs, main)
    else:  # two lists whose blocks alternate (Latte: spatial, temporal, spatial, ...): no run of one list
        joined = [_across_other_lists(runs, i) for i in range(len(runs))]
        joined = [(r, m) for r, m in joined if len(r[m]) >= 2]
        if not joined:
            raise NoBlockStack(
                "no block stack found: no run of two or more same-class blocks inside a ModuleList"
            )
        runs, main = max(joined, key=lambda found: stack_size(found[0][found[1]]))
    stacks = [i for i, run in enumerate(runs) if len(run) >= 2]
    first = last = main
    while first - 1 in stacks:
        first -= 1
    while last + 1 in stacks:
        last += 1
    return [
        BlockStack(runs[i][0].module.parent, runs[i][0].module.class_name, runs[i])
        for i in range(first, last + 1)
    ]
