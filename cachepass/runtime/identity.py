"""Which module instance a call belongs to, although Dynamo shares one program between instances.

Parameters are graph inputs, so Dynamo serves every instance of a class with the program compiled
for the first one (Wan2.2's two experts, two pipelines of one class in a server). The parameter
tensors a call receives still belong to the instance being called: one of them, the *identity
parameter*, names the instance. The first time a new identity parameter is seen, the module that
owns it is found among the calling frames' locals (Dynamo runs the transformed ``forward`` in a frame
whose ``self`` is the instance) and checked by looking the parameter up on it; the answer is kept
per parameter object, weakly, so later calls cost one dictionary lookup.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from .._dynamo import unwrap
from ..analysis.module_paths import qualified_name
from ..analysis.values import source_name

_FRAMES = 24  # how far up the stack the owning module is looked for

#: identity parameter -> weak reference to the module that owns it (or None: no module found)
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_UNSEEN = object()


def state_path(source: str) -> str | None:
    """``L['self'].__dict__['_modules']['blocks']._modules['0']._parameters['weight']`` -> ``blocks.0.weight``
    (the path of a parameter or buffer below the root variable), or ``None`` for a caller input."""
    if not source.startswith(("L[", "G[")) or ("_parameters" not in source and "_buffers" not in source):
        return None
    return qualified_name(source) or None


def lookup(module: torch.nn.Module, path: str) -> Any:
    """The parameter or buffer at ``path`` below ``module`` (``None`` when there is none)."""
    *parents, leaf = path.split(".")
    current = module
    for name in parents:
        current = getattr(current, "_modules", {}).get(name)
        if current is None:
            return None
    params = getattr(current, "_parameters", {})
    if leaf in params:
        return params[leaf]
    return getattr(current, "_buffers", {}).get(leaf)


class InstanceIdentity:
    """Per compiled graph: which input names the instance, and how to find its module.

    ``index`` is the placeholder of the identity parameter (``None`` when the graph reads no module
    state: then the module seen at compile time, if any, is the only owner).
    """

    def __init__(self, gm: fx.GraphModule, root: torch.nn.Module | None) -> None:
        self.index: int | None = None
        self.path: str | None = None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        candidates = []
        for i, node in enumerate(placeholders):
            path = state_path(source_name(node))
            if path is not None:
                candidates.append((0 if "_parameters" in source_name(node) else 1, i, path))
        if candidates:
            _, self.index, self.path = min(candidates)  # a parameter before a buffer, then graph order
        self._root = weakref.ref(root) if root is not None else None

    @property
    def root(self) -> torch.nn.Module | None:
        return self._root() if self._root is not None else None

    def owner(self, args: Sequence[Any]) -> Any:
        """The module this call runs (or, when it cannot be found, its identity parameter)."""
        if self.index is None:
            return self.root
        key = args[self.index]
        ref = _OWNERS.get(key, _UNSEEN)
        if ref is None:  # no module was found for it: the parameter stands for the instance
            return key
        if ref is not _UNSEEN:
            module = ref()
            if module is not None and lookup(module, self.path) is key:
                return module
        module = self._find(key)
        _OWNERS[key] = weakref.ref(module) if module is not None else None
        return module if module is not None else key

    def _find(self, key) -> torch.nn.Module | None:
        root = self.root
        if root is not None and lookup(root, self.path) is key:
            return root
        return next((m for m in modules_in_frames(sys._getframe(2), _FRAMES) if lookup(m, self.path) is key), None)


def modules_in_frames(frame, depth: int) -> Iterator[torch.nn.Module]:
    """The modules held by the locals of ``frame`` and the ``depth - 1`` frames above it, innermost first
    (a ``torch.compile`` wrapper as the module inside)."""
    for _ in range(depth):
        if frame is None:
            return
        for value in list(frame.f_locals.values()):
            if isinstance(value, torch.nn.Module):
                yield unwrap(value)
        frame = frame.f_back


def find_outer_module(root: torch.nn.Module | None, frame) -> torch.nn.Module | None:
    """The outermost module running in the Python frames from ``frame`` up that contains ``root`` (any
    module when ``root`` is unknown): the model whose ``forward`` graph breaks cut into pieces."""
    outer = None
    for module in modules_in_frames(frame, 400):
        if module is not root and module is not outer:
            if root is None or any(m is root for m in module.modules()):
                outer = module
    return outer


_OUTER: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def outer_owner(module: torch.nn.Module, frame) -> torch.nn.Module:
    """The model a block compiled on its own belongs to (found once per block, then remembered)."""
    ref = _OUTER.get(module)
    outer = ref() if ref is not None else None
    if outer is None:
        outer = find_outer_module(module, frame)
        outer = module if outer is None else outer
        _OUTER[module] = weakref.ref(outer)
    return outer
