"""Read which module a graph node came from, out of Dynamo's ``nn_module_stack`` metadata.

Dynamo records module paths as source expressions such as
``L['self'].__dict__['_modules']['blocks'].0.attn1`` (the spelling changes between torch releases).
Everything downstream wants the plain qualified name ``blocks.0.attn1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(\d+)\s*\]|\.?([A-Za-z_][A-Za-z_0-9]*|\d+)")
_CONTAINERS = {"__dict__", "_modules", "_parameters", "_buffers"}


def qualified_name(dynamo_path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn1`` -> ``blocks.0.attn1``."""
    tokens = [next(g for g in m.groups() if g is not None) for m in _TOKEN.finditer(dynamo_path)]
    if tokens and tokens[0] in ("L", "G"):  # the root: a local or global variable holding the model
        tokens = tokens[2:]
    return ".".join(t for t in tokens if t not in _CONTAINERS)


@dataclass(frozen=True)
class ModuleRef:
    """A module a node belongs to: its qualified name and class name."""

    qualified_name: str
    class_name: str

    @property
    def parent(self) -> str:
        return self.qualified_name.rpartition(".")[0]

    @property
    def index(self) -> int | None:
        last = self.qualified_name.rpartition(".")[2]
        return int(last) if last.isdigit() else None


def _class_name(cls) -> str:
    if isinstance(cls, str):
        return cls.rsplit(".", 1)[-1]
    return getattr(cls, "__qualname__", getattr(cls, "__name__", str(cls)))


def module_stack(node: fx.Node) -> list[ModuleRef]:
    """The node's module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    refs = []
    for value in stack.values():
        path, cls = value[0], value[1]
        refs.append(ModuleRef(qualified_name(path), _class_name(cls)))
    return refs


def enclosing_list_child(node: fx.Node) -> ModuleRef | None:
    """The outermost module on the node's stack that is an indexed child (``<list>.<i>``).

    Repeated blocks live in a ``ModuleList``/``Sequential``, so their qualified names end in an index.
    Taking the outermost such module attributes everything inside a block (including sub-lists such as
    ``to_out.0``) to the block itself.
    """
    for ref in module_stack(node):
        if ref.index is not None and ref.qualified_name:
            return ref
    return None
