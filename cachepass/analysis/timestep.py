"""Pass ``find_timestep``: the graph input that carries the diffusion timestep, and its embedding.

The timestep is recognised by what the model does with it, not by its name: it is a small (0-d or 1-d)
caller input that feeds a sinusoidal embedding (``sin``/``cos``). When several do (FLUX also embeds the
guidance scale that way), the one named like a timestep wins, else the first.

The timestep embedding is the body's conditioning input: a body input that depends on the timestep and
not on the inputs the residual stream comes from (Wan's ``timestep_proj``, FLUX's ``temb``).
"""

from __future__ import annotations

import math

import networkx as nx
import torch
import torch.fx as fx

from .values import example_value, is_user_input, source_name

_SINUSOID = {torch.sin, torch.cos, math.sin, math.cos, torch.ops.aten.sin.default, torch.ops.aten.cos.default}


def _is_sinusoid(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SINUSOID
    return node.op == "call_method" and node.target in ("sin", "cos")


def find_timestep_input(gm: fx.GraphModule, g: nx.DiGraph) -> fx.Node | None:
    sinusoids = [n for n in gm.graph.nodes if _is_sinusoid(n)]
    if not sinusoids:
        return None
    feeding = set().union(*(nx.ancestors(g, s) for s in sinusoids))
    candidates = []
    for node in gm.graph.nodes:
        if node in feeding and is_user_input(node):
            value = example_value(node)
            if isinstance(value, torch.Tensor) and value.dim() <= 1:
                candidates.append(node)
    if not candidates:
        return None
    named = [c for c in candidates if "timestep" in source_name(c).lower() or source_name(c) in ("L['t']",)]
    return (named or candidates)[0]


def find_timestep_embedding(
    g: nx.DiGraph, timestep: fx.Node | None, side_inputs: list[fx.Node], stream_sources: set[fx.Node]
) -> fx.Node | None:
    if timestep is None:
        return None
    for node in side_inputs:  # graph order: the first one the body reads
        if not isinstance(example_value(node), torch.Tensor):
            continue
        ancestors = nx.ancestors(g, node)
        if timestep in ancestors and not (ancestors & stream_sources):
            return node
    return None

