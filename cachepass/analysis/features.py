"""Named tensors inside the body that a policy may ask the compute variant to hand back.

Names: ``block_output:K`` (the first stream tensor leaving block ``K``) and ``attention_output:K``
(the output of the first attention sub-module of block ``K``, before its gate). ``K`` may be negative
(from the end) or ``middle`` (``len(blocks) // 2``), so policies never hard-code a depth.

``frame_grid`` (no index) is the 5-d ``(batch, channels, frames, height, width)`` latent the stream's
tokens are patched from (Wan's patch-embedding output): its shape tells a policy how many tokens make
one frame, which no ``(batch, tokens, width)`` stream tensor can.

``stream_input`` / ``stream_output`` (no index) are the first residual-stream tensor entering and
leaving the whole block stack: their difference is the residual a reuse replays, so calibration
records them. ``indicator:NAME`` is an indicator the analysis found (``timestep_embedding``,
``modulated_input``, ``first_block_output``), for a policy that compares several candidates.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from ..errors import UnsupportedStructure
from .module_paths import module_stack
from .values import example_value, tensor_signature


def _block_index(structure, token: str) -> int:
    n = len(structure.blocks)
    k = n // 2 if token == "middle" else int(token)
    k = k + n if k < 0 else k
    if not 0 <= k < n:
        raise UnsupportedStructure(f"feature block index {token!r} is outside the {n} blocks")
    return k


def _frame_grid(structure) -> fx.Node:
    """The nearest 5-d ancestor of the first stream input whose last three sizes multiply to its token
    count (dimension 1 of a ``(batch, tokens, width)`` stream)."""
    stream_in = structure.stream[0].input
    value = example_value(stream_in)
    if isinstance(value, torch.Tensor) and value.dim() == 3:
        order = structure.order
        for node in sorted(nx.ancestors(structure.dataflow, stream_in), key=order.__getitem__, reverse=True):
            grid = example_value(node)
            if isinstance(grid, torch.Tensor) and grid.dim() == 5:
                if str(grid.shape[2] * grid.shape[3] * grid.shape[4]) == str(value.shape[1]):
                    return node
    raise UnsupportedStructure(
        "feature 'frame_grid' not found: no 5-d (batch, channels, frames, height, width) latent that the "
        "residual stream's tokens come from (not a video model?); a policy that asks for it to count "
        "tokens per frame (adacache) takes tokens_per_frame=... or motion=False instead"
    )


def resolve_feature(structure, name: str) -> fx.Node:
    if name == "frame_grid":
        return _frame_grid(structure)
    if name in ("stream_input", "stream_output"):
        first = structure.stream[0]
        return first.input if name == "stream_input" else first.output
    kind, _, token = name.partition(":")
    if kind == "indicator":
        if token not in structure.indicators:
            found = ", ".join(sorted(structure.indicators)) or "none"
            raise UnsupportedStructure(f"feature {name!r}: this model has no indicator {token!r} (found: {found})")
        return structure.indicators[token]
    block = structure.blocks[_block_index(structure, token)]
    members = set(block.nodes)
    if kind == "block_output":
        shapes = {tensor_signature(s.input) for s in structure.stream}
        for node in block.nodes:
            if tensor_signature(node) in shapes and any(u not in members for u in node.users):
                return node
    elif kind == "attention_output":
        prefix = block.module.qualified_name + "."
        attention = None
        for node in block.nodes:
            refs = [r for r in module_stack(node) if r.qualified_name.startswith(prefix)]
            top = refs[0] if refs else None
            if top is not None and "attention" in top.class_name.lower():
                if attention is None:
                    attention = top.qualified_name
                if top.qualified_name == attention:
                    last = node
            elif attention is not None:
                return last
    else:
        raise UnsupportedStructure(
            f"unknown feature {name!r}: use block_output:K, attention_output:K, indicator:NAME, frame_grid, "
            "stream_input or stream_output"
        )
    raise UnsupportedStructure(f"feature {name!r} not found in block {block.module.qualified_name!r}")
