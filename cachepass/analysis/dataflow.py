"""Dataflow questions on an FX graph, answered with networkx: ancestry, convexity, mutation."""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

# Ops whose result aliases their first argument: a mutation through the result mutates the argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute", "squeeze", "unsqueeze",
    "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind", "as_strided", "t", "T",
    "contiguous", "detach", "type_as", "to", "float", "half", "bfloat16", "movedim",
}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.transpose, torch.permute,
                   torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk,
                   torch.unbind, torch.movedim, torch.detach}
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}
# A skip connection: the ops a residual stream passes through from a block's input to its output.
_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add"}
_CASTS = {"float", "half", "bfloat16", "double", "to", "type_as", "type", "contiguous"}


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Edges go from a value to each of its users."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def ancestors_within(g: nx.DiGraph, targets: Iterable[fx.Node], region: set[fx.Node]) -> set[fx.Node]:
    """``targets`` and their ancestors, restricted to ``region``."""
    out: set[fx.Node] = set()
    stack = [t for t in targets if t in region]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(p for p in g.predecessors(n) if p in region and p not in out)
    return out


def is_convex(g: nx.DiGraph, region: set[fx.Node]) -> bool:
    """No path leaves ``region`` and comes back into it."""
    return convexity_violation(g, region) is None


def convexity_violation(g: nx.DiGraph, region: set[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """A path that leaves ``region`` and comes back, as ``(left from, first node outside, came back
    at)``; ``None`` when the region is convex."""
    came_from: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # outside node -> (region node, first outside)
    stack = []
    for n in (m for m in g if m in region):  # graph order: the first violation is reported
        for s in g.successors(n):
            if s not in region and s not in came_from:
                came_from[s] = (n, s)
                stack.append(s)
    while stack:
        n = stack.pop()
        for s in g.successors(n):
            if s in region:
                left, outside = came_from[n]
                return left, outside, s
            if s not in came_from:
                came_from[s] = came_from[n]
                stack.append(s)
    return None


def is_inplace(node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    return False


def alias_root(node: fx.Node) -> fx.Node:
    """Follow view-like ops back to the value whose storage ``node`` shares."""
    while True:
        is_view = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target in _VIEW_FUNCTIONS
        )
        if not is_view or not node.args or not isinstance(node.args[0], fx.Node):
            return node
        node = node.args[0]


def mutations_escaping(region: set[fx.Node]) -> list[fx.Node]:
    """In-place nodes in ``region`` that write into a tensor created outside it."""
    bad = []
    for node in region:
        if is_inplace(node) and node.args and isinstance(node.args[0], fx.Node):
            if alias_root(node.args[0]) not in region:
                bad.append(node)
    return bad


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _CASTS


def skip_sources(node: fx.Node, is_source: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """The sources ``node`` reaches through additions and dtype casts only: the skip connections it sits
    on (``x + attn(x) * gate`` reaches ``x``; a rotary table read inside the attention is not reached)."""
    found: set[fx.Node] = set()
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_source(n):
            found.add(n)
        elif _is_add(n):
            stack.extend(a for a in n.args[:2] if isinstance(a, fx.Node))
        elif _is_cast(n) and n.args and isinstance(n.args[0], fx.Node):
            stack.append(n.args[0])
    return found
