"""Pass ``find_unet``: the DeepCache cut of a U-Net (arXiv 2312.00858), found from the graph's skip connections.

A U-Net (``UNet2DConditionModel``: SD 1.5, SDXL) has no stack of same-class blocks to skip; what changes
slowly from step to step is its *deep* features, the down path below the first level, the middle and the
up path up to the last level. DeepCache caches them and recomputes only the shallow branch: the input
convolution, the first down-block level (whose outputs are the shallowest skip tensors) and the last
up-block level.

Found from the graph, never from class names:

* a **skip connection** is a concatenation of two feature maps (tensors of 4 dimensions or more:
  ``(batch, channels, *spatial)``) along the channel axis, of which one, the *skip tensor*, is an ancestor
  of the other, the *up tensor*: a down-path value joined back into the up path
  (``cat([hidden_states, res_hidden], dim=1)``);
* the graph is a U-Net when its skip tensors have at least two spatial sizes (the levels of the path);
* the **shallowest level** is the skip connections whose skip tensor has the spatial size of the
  earliest skip tensor in graph order (the input convolution's output);
* the **deep feature** is the up tensor of the first of them (graph order): the up path's value entering
  the last up-block level. A reuse call gets it from the cache (a *value* reuse: no residual partner, the
  cached tensor is the value itself) and runs everything it does not feed, then everything it feeds.

The regions (:func:`unet_regions`), as the analysis' prologue / body / epilogue: ``after`` = the deep
feature's descendants (the last up level and the output layers, run on every call); ``head`` = what
``after`` reads besides the deep feature, with its ancestors (the timestep embedding, the input
convolution, the shallow down level: run on every call, before the decision), and what depends on no
deep value; ``cached`` = the rest: the deep feature and its ancestors not in the head, and the values
only they feed (skipped by a reuse call).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from .residual_stream import join_parts
from .values import example_value


@dataclass(frozen=True)
class SkipConnection:
    join: fx.Node  # the concatenation
    up: fx.Node  # the up-path tensor it extends
    skip: fx.Node  # the down-path tensor joined in (an ancestor of ``up``)

    @property
    def spatial(self) -> tuple[str, ...]:
        return tuple(str(d) for d in example_value(self.skip).shape[2:])


@dataclass(frozen=True)
class UNetCut:
    """A U-Net's DeepCache cut: its skip connections (graph order), those of the shallowest level, and
    the deep feature a reuse call reads from the cache."""

    skips: tuple[SkipConnection, ...]
    level: tuple[SkipConnection, ...]
    deep_feature: fx.Node

    @property
    def levels(self) -> int:
        return len({s.spatial for s in self.skips})


def _feature_map(node: fx.Node) -> bool:
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.dim() >= 4


def _cat_dim(node: fx.Node, ndim: int) -> int | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % ndim if isinstance(dim, int) else None


def _candidates(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """``(join, a, b)``: the concatenations of two feature maps along their channel axis (dimension 1; the
    concatenation itself makes their other sizes equal, also where dynamic shapes cannot tell) (cheap: no
    ancestry)."""
    found = []
    for node in gm.graph.nodes:
        parts = join_parts(node)
        if parts is None or len(parts) != 2 or not all(_feature_map(p) for p in parts):
            continue
        a, b = (example_value(p) for p in parts)
        if a.dim() == b.dim() and _cat_dim(node, a.dim()) == 1:
            found.append((node, parts[0], parts[1]))
    return found


def find_unet(gm: fx.GraphModule, g: nx.DiGraph | None = None) -> UNetCut | None:
    """The DeepCache cut (module docstring), or ``None`` when the graph is no U-Net."""
    candidates = _candidates(gm)
    if len(candidates) < 2:
        return None
    if g is None:
        from .dataflow import to_networkx

        g = to_networkx(gm.graph)
    skips = []
    for join, a, b in candidates:
        if b in nx.ancestors(g, a):
            skips.append(SkipConnection(join, a, b))
        elif a in nx.ancestors(g, b):
            skips.append(SkipConnection(join, b, a))
    if len({s.spatial for s in skips}) < 2:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shallowest = min(skips, key=lambda s: order[s.skip])
    level = tuple(s for s in skips if s.spatial == shallowest.spatial)
    deep = min(level, key=lambda s: order[s.join]).up
    return UNetCut(tuple(skips), level, deep)


def unet_regions(gm: fx.GraphModule, g: nx.DiGraph, cut: UNetCut) -> tuple[set, set, set]:
    """``(head, cached, after)`` of the module docstring, every node but the placeholders and the output."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    deep = cut.deep_feature
    after = {n for n in nx.descendants(g, deep) if n is not output}
    readers = list(after) + [output]
    needed = {a for r in readers for a in r.all_input_nodes if a not in after and a is not deep}
    head = set()
    stack = [n for n in needed if n.op != "placeholder"]
    while stack:
        n = stack.pop()
        if n in head:
            continue
        head.add(n)
        stack.extend(a for a in n.all_input_nodes if a.op != "placeholder" and a not in head)
    deep_work = ({deep} | nx.ancestors(g, deep)) - head
    deep_work = {n for n in deep_work if n.op not in ("placeholder", "output")}
    cached = set(deep_work)
    for n in deep_work:
        cached |= {d for d in nx.descendants(g, n) if d not in after and d is not output}
    head = {n for n in nodes if n not in after and n not in cached}
    return head, cached, after
