"""The torch.compile entry: options -> analysis -> partition -> graph variants -> compiled program.

``torch.compile(model, backend="cachepass", options={...})`` reaches :func:`cachepass_backend` through
the ``torch_dynamo_backends`` entry point; ``cachepass.backend(**options)`` returns the same thing as a
callable with the options already checked. Whenever caching cannot apply (no block stack, grad mode on,
an unsupported structure), the graph is compiled unchanged by ``inner`` and one warning says why.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ._logging import get_logger
from .analysis.structure import analyse
from .analysis.values import source_name
from .distributed import DecisionSync
from .errors import OptionError, UnsupportedStructure
from .options import Settings, parse_options
from .runtime.program import CachedProgram
from .runtime.state import ProgramState, runtime_for
from .transform.compile import compile_piece, example_inputs_for
from .transform.partition import partition
from .transform.variants import build_variants

log = get_logger(__name__)

_ROOT = re.compile(r"^(L|G)\['([^']+)'\]")


def find_root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The user's module this graph was traced from, read off Dynamo's current frame.

    Parameter placeholders name the variable that held the module (``L['self']``, ``L['fn']``,
    ``G['model']``); that variable is looked up in the frame Dynamo is translating.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    if tx is None:
        return None
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        m = _ROOT.match(source_name(node))
        if not m:
            continue
        scope = tx.f_locals if m.group(1) == "L" else tx.f_globals
        value = scope.get(m.group(2))
        if isinstance(value, torch.nn.Module):
            return value
    return None


def _fallback(gm, example_inputs, settings: Settings, reason: str, runtime) -> Callable:
    if runtime is not None:
        runtime.fallback_reasons.append(reason)
    log.warning(
        "cachepass: caching is off for this graph: %s. The graph runs unchanged, compiled by inner=%r; "
        "outputs equal a plain torch.compile.",
        reason, settings.inner if isinstance(settings.inner, str) else getattr(settings.inner, "__name__", "callable"),
    )
    return compile_piece(gm, example_inputs, settings.inner, settings.inductor_mode)


def _never_reused(*args):
    raise AssertionError("cachepass: the policy declared it never reuses, yet a reuse was requested")


def compile_with_settings(gm: fx.GraphModule, example_inputs: Sequence, settings: Settings) -> Callable:
    """Build the cache-aware program for one Dynamo graph (or the fallback)."""
    root = find_root_module(gm)
    runtime = runtime_for(root if root is not None else gm)
    if root is not None:
        settings.policy.check_model(root)
    if torch.is_grad_enabled():
        return _fallback(gm, example_inputs, settings,
                         "grad mode is on (caching is for inference: run under torch.no_grad() "
                         "or torch.inference_mode())", runtime)
    try:
        structure = analyse(gm, root)
        requirements = settings.policy.requirements()
        part = partition(structure, requirements)
        variants = build_variants(gm, structure, part, requirements)
    except UnsupportedStructure as exc:
        return _fallback(gm, example_inputs, settings, str(exc), runtime)

    pieces = {}
    names = ("head", "compute", "reuse") if requirements.reuses else ("head", "compute")
    pieces["reuse"] = _never_reused
    for name in names:
        piece = getattr(variants, name)
        pieces[name] = compile_piece(piece, example_inputs_for(piece, example_inputs), settings.inner,
                                     settings.inductor_mode)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    timestep_index = placeholders.index(structure.timestep_input) if structure.timestep_input is not None else None
    if timestep_index is None:
        log.warning(
            "cachepass: no timestep input found (no small input feeding a sin/cos embedding): every call "
            "counts as a new step of one stream; pass num_steps=... or call cachepass.reset(model) "
            "between generations."
        )
    state = ProgramState(settings.policy, requirements.reconstruction, settings.num_steps,
                         DecisionSync(settings.sync, settings.process_group))
    runtime.programs.append(state)
    program = CachedProgram(
        pieces["head"], pieces["compute"], pieces["reuse"], state=state,
        has_indicator=variants.has_indicator, num_outputs=variants.num_outputs,
        num_cache_writes=variants.num_cache_writes, timestep_index=timestep_index,
    )
    program.on_call = lambda s: setattr(runtime, "last_active", s)
    log.info(
        "cachepass: policy %r on %d blocks (%s), %d residual-stream tensor(s); head %d / body %d / tail %d nodes",
        settings.policy_name, len(structure.blocks), ", ".join(s.parent for s in structure.stacks),
        len(structure.stream), len(structure.head), len(structure.body), len(structure.tail),
    )
    return program


def cachepass_backend(gm: fx.GraphModule, example_inputs: Sequence, options: Mapping[str, Any] | None = None,
                      mode: str | None = None) -> Callable:
    """The ``backend="cachepass"`` entry point (``options=`` and ``mode=`` come from ``torch.compile``;
    ``mode`` is handed to inductor when it is the inner compiler)."""
    return compile_with_settings(gm, example_inputs, _with_mode(parse_options(options), mode))


def _with_mode(settings: Settings, mode: str | None) -> Settings:
    if mode is None:
        return settings
    if settings.inner != "inductor":
        raise OptionError(f"mode={mode!r} applies to inner='inductor' only; inner is {settings.inner!r}")
    return dataclasses.replace(settings, inductor_mode=mode)


class CachepassBackend:
    """``cachepass.backend(**options)``: the backend with its options checked up front."""

    __name__ = "cachepass"

    def __init__(self, **options: Any) -> None:
        self.settings = parse_options(options)
        self.options = dict(options)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence, mode: str | None = None) -> Callable:
        return compile_with_settings(gm, example_inputs, _with_mode(self.settings, mode))

    def __repr__(self) -> str:
        return f"cachepass.backend({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def backend(**options: Any) -> CachepassBackend:
    return CachepassBackend(**options)
