"""Compile each graph piece with the ``inner`` compiler.

Every result is called as ``fn(*args)``, the convention Dynamo uses for what a backend returns (the
``_boxed_call`` flag that ``functools.wraps`` copies onto inductor's outer wrapper does not apply to it).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.fx as fx

from .._dynamo import compile_with_inductor, lookup_backend
from .._logging import get_logger

log = get_logger(__name__)


def compile_piece(gm: fx.GraphModule, example_inputs: Sequence, inner, mode: str | None = None) -> Callable:
    """``inner``: ``"eager"`` (run the FX code), ``"inductor"`` (with ``torch.compile``'s ``mode``
    options, if any), another registered backend name, or a backend callable ``(gm, example_inputs)``."""
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        return compile_with_inductor(gm, example_inputs, mode)
    if isinstance(inner, str):
        inner = lookup_backend(inner)
    return inner(gm, list(example_inputs))


def inner_name(inner) -> str:
    """How ``inner`` is named in messages: the backend name, or the callable's name."""
    return inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")


def example_inputs_for(piece: fx.GraphModule, graph_inputs: Sequence) -> list:
    """Example inputs of a piece: Dynamo's for the original inputs, node metadata for the rest."""
    phs = [n for n in piece.graph.nodes if n.op == "placeholder"]
    examples = list(graph_inputs)
    for ph in phs[len(examples):]:
        examples.append(ph.meta.get("example_value", ph.meta.get("val")))
    return examples
