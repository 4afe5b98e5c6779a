"""The private parts of Dynamo and Inductor cachepass relies on, in one place (checked on torch 2.13).

Everything here is reached through ``torch._dynamo`` / ``torch._inductor`` internals or attributes that
PyTorch does not document; when a torch release moves one of them, this is the file to change.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.exc import (
    ShortenTraceback,  # an exception Dynamo re-raises as it is (OptionError)
)

__all__ = ["ShortenTraceback", "compile_with_inductor", "list_backends", "lookup_backend", "placeholder_source",
           "reset_code", "tracing_scopes", "unwrap"]


def tracing_scopes() -> tuple[dict, dict] | None:
    """``(f_locals, f_globals)`` of the frame Dynamo is translating now (inside a backend call), or ``None``."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    if tx is None:
        return None
    return tx.f_locals, tx.f_globals


def placeholder_source(node: fx.Node) -> str | None:
    """Dynamo's source expression for a placeholder (``L['kwargs']['timestep']``), or ``None``."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    try:
        return source.name() if callable(getattr(source, "name", None)) else str(source.name)
    except Exception:  # pragma: no cover - defensive against source API changes
        return None


def unwrap(model: Any) -> Any:
    """The module inside ``torch.compile``'s ``OptimizedModule`` (``model`` itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def lookup_backend(name: str) -> Callable:
    from torch._dynamo.backends.registry import lookup_backend as lookup

    return lookup(name)


def list_backends() -> list[str]:
    from torch._dynamo.backends.registry import list_backends as names

    return list(names())


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence, mode: str | None = None) -> Callable:
    """Inductor's compile of a GraphModule, with ``torch.compile``'s ``mode`` options when given."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=list_mode_options(mode) if mode else None)


def reset_code(code) -> None:
    """Drop Dynamo's compiled entries for one code object."""
    torch._dynamo.reset_code(code)
