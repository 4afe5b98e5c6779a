"""The torch.compile entry: options -> analysis -> partition -> graph variants -> compiled program.

``torch.compile(model, backend="cachepass", options={...})`` reaches :func:`cachepass_backend` through
the ``torch_dynamo_backends`` entry point; ``cachepass.backend(**options)`` returns the same thing as a
callable with the options already checked. Whenever caching cannot apply (no block stack, grad mode on,
an unsupported structure), the graph is compiled unchanged by ``inner`` and one warning says why.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from . import graph_dump
from ._dynamo import tracing_scopes
from ._logging import get_logger, warn_once
from .analysis.blocks import blocks_in_graph_order
from .analysis.structure import DenoiserStructure
from .analysis.training import has_active_dropout
from .analysis.values import is_user_input, source_name
from .errors import NoBlockStack, OptionError, SplitStack, UnsupportedStructure
from .options import Settings, parse_options
from .runtime import fragments, signals
from .runtime.distributed import DecisionSync
from .runtime.identity import InstanceIdentity, find_outer_module
from .runtime.program import CachedProgram, UncachedProgram
from .runtime.state import runtime_for
from .stages import ANALYSIS, COMPILE, TRANSFORM, PassState, run_stages
from .transform.compile import compile_piece, inner_name

log = get_logger(__name__)
signals.install()  # diffusers' cache_context reaches cachepass from the first pipeline call on

_ROOT = re.compile(r"^(L|G)\['([^']+)'\]")


def find_root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The user's module this graph was traced from, read off Dynamo's current frame.

    Parameter placeholders name the variable that held the module (``L['self']``, ``L['fn']``,
    ``G['model']``); that variable is looked up in the frame Dynamo is translating.
    """
    scopes = tracing_scopes()
    if scopes is None:
        return None
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        m = _ROOT.match(source_name(node))
        if not m:
            continue
        scope = scopes[0] if m.group(1) == "L" else scopes[1]
        value = scope.get(m.group(2))
        if isinstance(value, torch.nn.Module):
            return value
    return None


def split_block(outer: torch.nn.Module, root: torch.nn.Module) -> tuple[str, int] | None:
    """``(list path, blocks)`` when ``root`` is one of two or more same-class children of a list in
    ``outer``: a block compiled alone because graph breaks split the stack."""
    for name, module in outer.named_modules():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and any(c is root for c in module):
            same = sum(1 for c in module if type(c) is type(root))
            if same >= 2:
                return name, len(module)
    return None


def _is_stack_list(m) -> bool:
    return (isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) >= 2
            and len({type(c) for c in m}) == 1)


def _has_stack(module: torch.nn.Module) -> bool:
    return any(_is_stack_list(m) for m in module.modules())


def _holds_stack_blocks(gm, root: torch.nn.Module) -> bool:
    """Whether the graph runs any block of a list of ``root`` that is a stack (same-class children)."""
    for block in blocks_in_graph_order(gm):
        try:
            parent = root.get_submodule(block.module.parent)
        except AttributeError:
            return True  # a path Dynamo named that the module tree does not know: assume it is
        if _is_stack_list(parent):
            return True
    return False


def _model_key(root) -> Any:
    """What a once-per-model warning is keyed on (the module's id while it lives)."""
    return id(root) if root is not None else None


def _fallback(gm, example_inputs, settings: Settings, reason: str, root, identity: InstanceIdentity,
              counts: bool = True, warn_key: Any = None, warn: bool = True, split: bool = False,
              state: PassState | None = None) -> Callable:
    """The unchanged graph compiled by ``inner``, wrapped so its calls count as uncached (``counts``:
    not for a graph that holds no blocks beside other graphs of the model)."""
    if state is not None:
        state.outcome = f"caching off: {reason}"
    if root is not None:
        runtime = runtime_for(root)
        if reason not in runtime.fallback_reasons:
            runtime.fallback_reasons.append(reason)
    if warn:
        warn_once(log, ("fallback", warn_key or reason, _model_key(root)),
                  "cachepass: caching is off for this graph: %s. The graph runs unchanged, compiled by inner=%r; "
                  "outputs equal a plain torch.compile.", reason, inner_name(settings.inner))
    compiled = compile_piece(gm, example_inputs, settings.inner, settings.inductor_mode)
    return UncachedProgram(compiled, identity, reason, counts, outer=split)


def _never_reused(*args):
    raise AssertionError("cachepass: the policy declared it never reuses, yet a reuse was requested")


def settings_key(settings: Settings) -> tuple:
    """What tells one compile's options from another's (stats count the calls of the current one)."""
    return settings.policy_name, repr(settings.policy.config), settings.num_steps, settings.branches


def signature_inputs(placeholders) -> list[int]:
    """The caller inputs a cache entry's signature is made of: every tensor and scalar argument, not the
    sizes Dynamo lifts out of tensors under dynamic shapes (``x.size()[1]``: the tensor's shape has it),
    so that a shape-generic graph and the static one it replaced agree on a call's signature."""
    out = []
    for i, node in enumerate(placeholders):
        name = source_name(node)
        if is_user_input(node) and not any(k in name for k in (".size()", ".stride()", ".storage_offset()")):
            out.append(i)
    return out


def compile_with_settings(gm: fx.GraphModule, example_inputs: Sequence, settings: Settings, *,
                          configure: Callable[[DenoiserStructure], Settings] | None = None) -> Callable:
    """Build the cache-aware program for one Dynamo graph (or the fallback).

    The program is shared by every instance of the module's class that Dynamo serves with this graph;
    all its state lives per instance (:mod:`cachepass.runtime.state`). The pass runs as the stages of
    :mod:`cachepass.stages`, each graph analysed once. ``configure``, when given, is called with the
    analysis' structure once the analysis stages succeed and returns the settings to go on with
    (calibration records the indicators the analysis found). With ``settings.debug_dir`` the graphs are
    written there (:mod:`cachepass.graph_dump`), also when the pass falls back or raises."""
    root = find_root_module(gm)
    state = PassState(gm, root, example_inputs=example_inputs, inner=settings.inner,
                      inductor_mode=settings.inductor_mode)
    final = [settings]
    try:
        program = _compile(gm, example_inputs, settings, root, state, configure, final)
    except BaseException as exc:
        if final[0].debug_dir is not None:
            graph_dump.write(final[0].debug_dir, state, policy=final[0].policy_name,
                             outcome=f"error: {type(exc).__name__}: {exc}")
        raise
    if final[0].debug_dir is not None:
        graph_dump.write(final[0].debug_dir, state, policy=final[0].policy_name, outcome=state.outcome)
    return program


def _compile(gm, example_inputs, settings: Settings, root, state: PassState, configure, final: list) -> Callable:
    identity = InstanceIdentity(gm, root)
    if root is not None:
        settings.policy.check_model(root)
    if has_active_dropout(gm):
        warn_once(
            log, ("training", _model_key(root)),
            "cachepass: %s runs dropout (it is in training mode): its outputs are random, so a cached step "
            "stands for none of them. Call model.eval() for inference.",
            type(root).__name__ if root is not None else "the model")
    if torch.is_grad_enabled():
        return _fallback(gm, example_inputs, settings,
                         "grad mode is on (caching is for inference: run under torch.no_grad() "
                         "or torch.inference_mode())", root, identity, state=state)
    try:
        run_stages(state, ANALYSIS)
        if configure is not None:
            settings = final[0] = configure(state.structure)
        requirements = state.requirements = settings.policy.requirements()
        run_stages(state, TRANSFORM)
    except NoBlockStack as exc:
        outer = find_outer_module(root, sys._getframe())
        piece = fragments.block_graph_program(gm, example_inputs, settings, root, outer, identity, state)
        if piece is not None:  # a graph of a block's own frame: a fragment of a stack split by graph breaks
            return piece
        split = split_block(outer, root) if outer is not None and root is not None else None
        if split is not None:  # a block in a graph of its own: the stack is split by graph breaks
            parent, count = split
            reason = (f"a graph break splits the block stack {parent!r} ({count} blocks) of "
                      f"{type(outer).__name__}: its blocks run in graphs of their own, uncached. Remove the "
                      "break (run with fullgraph=True, or TORCH_LOGS=graph_breaks, to see where it is)")
            return _fallback(gm, example_inputs, settings, reason, outer, identity, warn_key=("split", parent),
                             split=True, state=state)
        # a helper piece of a model whose stack is elsewhere: a graph inside the model, or a graph of the
        # model's own frame that runs no block of its stacks (before a graph break: Lumina2's embeddings)
        helper_of = outer
        if helper_of is None and root is not None and not _holds_stack_blocks(gm, root):
            helper_of = root
        if helper_of is not None and _has_stack(helper_of):
            log.debug("cachepass: a graph of %s holds no blocks (%s); it runs unchanged",
                      type(helper_of).__name__, exc)
            return fragments.helper_program(gm, _fallback(gm, example_inputs, settings, str(exc), root, identity,
                                                          counts=False, warn=False, state=state), identity)
        return _fallback(gm, example_inputs, settings, str(exc), root, identity, counts=False, state=state)
    except SplitStack as exc:  # the model's frame split by graph breaks: each graph a fragment, else one warning
        program = fragments.split_graph_program(gm, example_inputs, settings, root, identity, state)
        if program is not None:
            return program
        return _fallback(gm, example_inputs, settings, str(exc), root, identity, warn_key=("split", exc.parent),
                         state=state)
    except UnsupportedStructure as exc:
        return _fallback(gm, example_inputs, settings, str(exc), root, identity, state=state)

    run_stages(state, (COMPILE,))
    structure, variants, pieces = state.structure, state.variants, dict(state.pieces)
    if not requirements.reuses:
        pieces["reuse"] = _never_reused

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    timestep_index = placeholders.index(structure.timestep_input) if structure.timestep_input is not None else None
    if timestep_index is None:
        warn_once(
            log, ("no timestep", _model_key(root)),
            "cachepass: no timestep input found (no small input feeding a sin/cos embedding): outside a "
            "diffusers pipeline every call counts as a new step of one branch; pass num_steps=... or call "
            "cachepass.reset(model) between generations.",
        )
    key = settings_key(settings)
    program = CachedProgram(
        pieces["head"], pieces["compute"], pieces["reuse"],
        policy=settings.policy, reconstruction=requirements.reconstruction, settings_key=key,
        num_steps=settings.num_steps, sync=DecisionSync(settings.sync, settings.process_group),
        branches=settings.branches, identity=identity, input_indices=signature_inputs(placeholders),
        has_indicator=variants.has_indicator, num_outputs=variants.num_outputs,
        num_cache_writes=variants.num_cache_writes, timestep_index=timestep_index, reuses=requirements.reuses,
        layout=(key, variants.num_outputs, variants.num_cache_writes, variants.has_indicator,
                tuple(b.module.qualified_name for b in structure.blocks),
                tuple(source_name(s.input) for s in structure.stream)),
    )
    if settings.decisions == "device":
        from .runtime.device_program import device_program

        program = device_program(program, state, settings)
    state.outcome = "caching: on"
    log.info(
        "cachepass: policy %r on %d blocks (%s), %d residual-stream tensor(s); prologue %d / body %d / epilogue %d "
        "nodes", settings.policy_name, len(structure.blocks), ", ".join(s.parent for s in structure.stacks),
        len(structure.stream), len(structure.prologue), len(structure.body), len(structure.epilogue),
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

    def __init__(self, /, **options: Any) -> None:
        self.settings = parse_options(options)
        self.options = dict(options)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence, mode: str | None = None) -> Callable:
        return compile_with_settings(gm, example_inputs, _with_mode(self.settings, mode))

    def __repr__(self) -> str:
        return f"cachepass.backend({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def backend(**options: Any) -> CachepassBackend:
    return CachepassBackend(**options)
