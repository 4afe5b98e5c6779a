"""Named tensors inside the body that a policy may ask the compute variant to hand back.

Names: ``block_output:K`` (the first stream-shaped tensor leaving block ``K``; a joined stream's
output shape counts) and ``attention_output:K``
(the output of the first attention sub-module of block ``K``, before its gate). ``K`` may be negative
(from the end) or ``middle`` (``len(blocks) // 2``), so policies never hard-code a depth.

``frame_grid`` (no index) is the 5-d ``(batch, channels, frames, height, width)`` latent the stream's
tokens are patched from (Wan's patch-embedding output): its shape tells a policy how many tokens make
one frame, which no ``(batch, tokens, width)`` stream tensor can.

``stream_input`` / ``stream_output`` (no index) are the first residual-stream tensor entering and
leaving the whole block stack: their difference is the residual a reuse replays, so calibration
records them. A joined stream (:mod:`~cachepass.analysis.residual_stream`) has no ``stream_input``:
no tensor entering the blocks is its partner. ``indicator:NAME`` is an indicator the analysis found (``timestep_embedding``,
``modulated_input``, ``first_block_output``: :data:`~cachepass.analysis.indicators.INDICATORS`), for a
policy that compares several candidates; a policy's ``Requirements.indicator`` may name its indicator
the same way (``indicator:timestep_embedding`` or just ``timestep_embedding``, see :func:`indicator_name`).

:func:`check_feature_name` checks a name's spelling without a graph (a policy's requirements are
checked before anything is traced); :func:`resolve_feature` finds the node in an analysed graph.
"""

from __future__ import annotations

import re

import networkx as nx
import torch
import torch.fx as fx

from ..errors import UnsupportedStructure
from .indicators import INDICATORS
from .module_paths import module_stack
from .values import example_value, tensor_signature

#: Features of one block: ``KIND:K``, ``K`` ``middle`` or an integer of at most 5 digits (negative: from the end).
BLOCK_FEATURE = re.compile(r"(block_output|attention_output):(middle|-?[0-9]{1,5})")
#: Features without an index.
PLAIN_FEATURES = ("frame_grid", "stream_input", "stream_output")
#: What every name error lists.
NAMES = "block_output:K, attention_output:K, indicator:NAME, frame_grid, stream_input or stream_output"


def _unknown(name) -> str:
    return f"unknown feature {name!r}: use {NAMES}"


def check_feature_name(name) -> str:
    """``name`` if it is a feature name (the grammar above; ``indicator:NAME`` with ``NAME`` an
    analysis indicator), else ``ValueError`` saying what is allowed. No graph needed."""
    if isinstance(name, str) and (name in PLAIN_FEATURES or BLOCK_FEATURE.fullmatch(name)):
        return name
    if isinstance(name, str) and name.startswith("indicator:"):
        indicator = name.partition(":")[2]
        found = [n for n, i in INDICATORS.items() if not i.made_by_partition]
        if indicator in found:
            return name
        if indicator in INDICATORS:
            raise ValueError(f"feature {name!r}: {indicator!r} is made by the partition from the policy's "
                             "compute_first blocks; it can be the policy's Requirements.indicator, not a feature")
        raise ValueError(f"feature {name!r}: no indicator {indicator!r} (indicators: {', '.join(found)})")
    raise ValueError(_unknown(name))


def indicator_name(name) -> str:
    """The indicator a policy names in ``Requirements.indicator``: ``NAME`` or the feature name
    ``indicator:NAME``, ``NAME`` one of :data:`~cachepass.analysis.indicators.INDICATORS`; returned as
    ``NAME`` (what the analysis keys its indicators by). Else ``ValueError``."""
    if isinstance(name, str):
        bare = name[len("indicator:"):] if name.startswith("indicator:") else name
        if bare in INDICATORS:
            return bare
    raise ValueError(
        f"indicator {name!r} is not one the head graph can compute before the decision: use one of "
        f"{', '.join(map(repr, INDICATORS))} (or 'indicator:NAME'); a tensor inside the blocks is observed "
        "after a computed call instead (Requirements.observe)")


def token_dependent(name: str) -> bool:
    """Whether the feature or indicator ``name`` holds per-token values, which differ between the ranks
    of a sequence-parallel run (so statistics of it must be summed over them); ``frame_grid`` is read
    for its shape only, ``timestep_embedding`` is the same everywhere."""
    if name == "frame_grid":
        return False
    if name.startswith("indicator:") or name in INDICATORS:
        return INDICATORS[indicator_name(name)].token_dependent
    return True


def _block_index(structure, token: str) -> int:
    n = len(structure.blocks)
    k = n // 2 if token == "middle" else int(token)
    k = k + n if k < 0 else k
    if not 0 <= k < n:
        raise UnsupportedStructure(f"feature block index {token!r} is outside the {n} blocks")
    return k


def _first_stream_tensor(structure, name: str):
    """The first residual-stream tensor (``structure.stream[0]``), or :class:`UnsupportedStructure` naming
    the feature ``name`` when the block stack carries none."""
    if not structure.stream:
        raise UnsupportedStructure(
            f"feature {name!r} needs the residual stream, but no stream tensor was found: no tensor leaves "
            "the block stack paired with one entering it, so there is no stream input or output to observe"
        )
    return structure.stream[0]


def _frame_grid(structure) -> fx.Node:
    """The nearest 5-d ancestor of the first stream input whose last three sizes multiply to its token
    count (dimension 1 of a ``(batch, tokens, width)`` stream)."""
    for stream_in in _first_stream_tensor(structure, "frame_grid").inputs:  # a joined stream: each joined input
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
        first = _first_stream_tensor(structure, name)
        if first.join is not None and name == "stream_input":
            raise UnsupportedStructure(
                f"feature {name!r}: the residual stream is joined ({first.output.name!r} leaves the blocks as "
                f"{first.start_name} of the tensors entering them, made by {first.join.name!r}): no tensor "
                "entering the blocks pairs with it, so there is no stream input to observe"
            )
        return first.input if name == "stream_input" else first.output
    kind, _, token = name.partition(":")
    if kind != "indicator" and not BLOCK_FEATURE.fullmatch(name):
        raise UnsupportedStructure(_unknown(name))
    if kind == "indicator":
        if token not in structure.indicators:
            found = ", ".join(sorted(structure.indicators)) or "none"
            raise UnsupportedStructure(f"feature {name!r}: this model has no indicator {token!r} (found: {found})")
        return structure.indicators[token]
    block = structure.blocks[_block_index(structure, token)]
    members = set(block.nodes)
    if kind == "block_output":
        shapes = {tensor_signature(n) for s in structure.stream for n in (*s.inputs, s.output)}
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
    raise UnsupportedStructure(f"feature {name!r} not found in block {block.module.qualified_name!r}")
