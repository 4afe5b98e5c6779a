"""Named tensors inside the body that a policy may ask the compute variant to hand back.

Names: ``block_output:K`` (the first stream tensor leaving block ``K``) and ``attention_output:K``
(the output of the first attention sub-module of block ``K``, before its gate). ``K`` may be negative
(from the end) or ``middle`` (``len(blocks) // 2``), so policies never hard-code a depth.
"""

from __future__ import annotations

import torch.fx as fx

from ..errors import UnsupportedStructure
from .module_paths import module_stack
from .values import tensor_signature


def _block_index(structure, token: str) -> int:
    n = len(structure.blocks)
    k = n // 2 if token == "middle" else int(token)
    k = k + n if k < 0 else k
    if not 0 <= k < n:
        raise UnsupportedStructure(f"feature block index {token!r} is outside the {n} blocks")
    return k


def resolve_feature(structure, name: str) -> fx.Node:
    kind, _, token = name.partition(":")
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
        raise UnsupportedStructure(f"unknown feature {name!r}: use block_output:K or attention_output:K")
    raise UnsupportedStructure(f"feature {name!r} not found in block {block.module.qualified_name!r}")
