"""Pass ``find_block_parts``: split each block into the parts worth predicting and the rest.

TaylorSeer's per-block granularity predicts the outputs of a block's expensive sub-modules (attention,
feed-forward) and recomputes its cheap glue (norms, timestep modulation, gates, residual adds) with
the current step's inputs. No names are read: a *part* is a direct child module of a block that

* does matrix work (linear, matmul, attention, convolution) on a value that depends on the residual
  stream: AdaLN modulation linears read only the timestep embedding, so they stay recomputed;
* lies entirely in the region being cached and writes into nothing made outside itself;
* hands only tensors to the rest of the block.

A part's *outputs* are its nodes read outside it, in graph order, that still reach the graph's
output once every part is removed: the part outputs a compute call stores and a reuse call predicts (an
output read only by another part, like FLUX's MLP input projection feeding the predicted output
projection, is never needed, so it is not cached). Every node of a part is dropped from the reuse
variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from .._logging import get_logger
from .dataflow import mutations_escaping
from .module_paths import module_stack
from .values import example_value

log = get_logger(__name__)

#: Targets (by name) that make a sub-module expensive enough to predict.
_MATRIX_OPS = {
    "linear", "matmul", "mm", "bmm", "baddbmm", "addmm", "einsum", "scaled_dot_product_attention",
    "conv1d", "conv2d", "conv3d", "multi_head_attention_forward",
}
_MATRIX_MODULES = {"Linear", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention"}


@dataclass
class BlockPart:
    """One predictable sub-module call inside a block."""

    block: int
    name: str  # qualified module name, e.g. ``blocks.3.attn1``
    nodes: set[fx.Node]
    outputs: list[fx.Node]


def is_matrix_op(node: fx.Node) -> bool:
    if node.op in ("call_function", "call_method"):
        target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return str(target).rsplit(".", 1)[-1] in _MATRIX_OPS
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return type(module).__name__ in _MATRIX_MODULES
    return False


def _child_scopes(structure, k: int) -> dict[str, list[fx.Node]]:
    """Nodes of block ``k`` grouped by the block's direct child module they run in (graph order)."""
    block = structure.blocks[k]
    prefix = block.module.qualified_name + "."
    scopes: dict[str, list[fx.Node]] = {}
    for node in block.nodes:
        inner = [r.qualified_name for r in module_stack(node) if r.qualified_name.startswith(prefix)]
        if inner:
            child = prefix + inner[0][len(prefix):].split(".", 1)[0]
            scopes.setdefault(child, []).append(node)
    return scopes


def find_block_parts(structure, first: int, last: int, region: set[fx.Node]) -> list[BlockPart]:
    """The predictable parts of blocks ``[first, last)`` whose nodes all lie in ``region``."""
    stream_in = structure.boundary_values(first)
    stream_dependent = set(stream_in).union(*(nx.descendants(structure.dataflow, s) for s in stream_in))
    parts = []
    for k in range(first, last):
        for name, nodes in _child_scopes(structure, k).items():
            members = set(nodes)
            outputs = [n for n in nodes if any(u not in members for u in n.users)]
            reason = None
            if not any(is_matrix_op(n) and n in stream_dependent for n in nodes):
                reason = "no matrix work on the residual stream"
            elif not members <= region:
                reason = "partly computed before the cache decision"
            elif mutations_escaping(members):
                reason = "writes into tensors made outside it"
            elif not outputs or not all(isinstance(example_value(n), torch.Tensor) for n in outputs):
                reason = "hands non-tensor values to the block"
            if reason is None:
                parts.append(BlockPart(k, name, members, outputs))
            log.debug("block part %s: %s", name, "predicted" if reason is None else f"recomputed ({reason})")
    removed = set().union(*(p.nodes for p in parts))
    graph_output = next(n for n in reversed(structure.gm.graph.nodes) if n.op == "output")
    for part in parts:
        part.outputs = [n for n in part.outputs if _reaches(n, graph_output, removed)]
    return parts


def _reaches(node: fx.Node, target: fx.Node, removed: set[fx.Node]) -> bool:
    """Whether a path of users leads from ``node`` to ``target`` without entering ``removed``."""
    stack, seen = [node], set()
    while stack:
        for user in stack.pop().users:
            if user is target:
                return True
            if user not in removed and user not in seen:
                seen.add(user)
                stack.append(user)
    return False
