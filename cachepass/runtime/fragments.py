"""A block stack split by graph breaks: one cache decision per denoiser call, followed by every fragment.

Data-dependent code (a ``Tensor.item()``, a host read, a ``torch.compiler.disable`` call) splits a
denoiser's ``forward`` into several Dynamo graphs. Two shapes occur:

* the model's own frame is split (the break is not inside a loop): each graph holds the blocks between two
  breaks, the first one also the prologue, the last one the epilogue; their root module is the model;
* the break is inside the loop over the blocks: Dynamo gives up on the model's frame (a graph break in a
  loop), runs it as Python, and compiles every block's ``forward`` as a frame of its own, whose root
  module is the block; a break inside a block splits that frame again. One such graph serves every block
  of its class (parameters are graph inputs).

Each graph that holds blocks of a list (or part of one block) is a **fragment**, run by a
:class:`FragmentProgram`. Which model and which block a call belongs to is read off the call: the
identity parameter names the module (:mod:`cachepass.runtime.identity`), the outer model is the one
running in the calling frames, and the block's list and index come from the outer model's module tree
(``outer.named_modules()``, lists of two or more same-class children; nothing keyed on a name). A graph
without module state (a resume function of a block) takes its block from the nearest frame holding a
module.

**One decision per denoiser call.** The first fragment of a call that holds block 0 of its list
**leads**: it places the call (request, step, branch), asks the policy and records the decision with
the outer call's Python frame (the innermost frame whose locals hold the outer model). Every later
fragment **follows** it while that frame is on its own call stack (frame identity, held while the
decision lives: never another call, another thread, another instance). Per fragment, a cache entry in the
leader's branch (so a new request, another branch or a new signature of the leader starts them all
afresh), keyed by the fragment's layout, list, block index and occurrence in the call, and served only
at the fragment's own input signature. A follower computes when the decision is compute, when its entry
is missing or was written at another signature, and a fragment seen without a decision for the current
call computes. The decision (and the frame) is let go at the next call's leader, or when its request
ends: one call's frame, whose locals are a few stream-sized tensors, beside the fragments' residuals.

Stats count the leader's calls only: a split model's call counts once, not once per fragment.

A graph inside a block that pairs nothing (:mod:`cachepass.transform.fragments`) is a :class:`BlockPiece`:
it always computes. When a whole denoiser call passes without a leader (the policy needs an indicator such
graphs cannot compute, or no graph of the stack carries the residual stream), one warning says why and the
calls count as uncached.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._dynamo import unwrap
from .._logging import get_logger, warn_once
from ..policies.base import Requirements
from ..reconstruction.base import ReuseCache
from . import signals
from .identity import InstanceIdentity, outer_owner
from .program import CachedProgram, _watch, call_signature, timestep_key
from .state import ModelRuntime, runtime_for

log = get_logger(__name__)

#: how far up the stack a decision's frame, or a block's frame, is looked for
_DEPTH = 200
_NEAR = 24

# --- which block of which list ---------------------------------------------------------------------

#: outer model -> {module inside a block: (list path, block index, list length)}
_SITES: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
#: module inside a block -> weak reference to its outer model (for graphs without module state)
_KNOWN: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def _site_map(outer: torch.nn.Module) -> "weakref.WeakKeyDictionary":
    sites = _SITES.get(outer)
    if sites is None:
        sites = weakref.WeakKeyDictionary()
        for path, container in outer.named_modules():  # pre-order: the outermost list claims a module
            if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)) or len(container) < 2:
                continue
            children = list(container)
            for index, child in enumerate(children):
                if sum(1 for c in children if type(c) is type(child)) < 2:
                    continue
                for module in child.modules():
                    if module not in sites:
                        sites[module] = (path, index, len(children))
                        _KNOWN[module] = weakref.ref(outer)
        _SITES[outer] = sites
    return sites


def site_of(outer: torch.nn.Module, module: torch.nn.Module) -> tuple[str, int, int] | None:
    """``(list path, block index, list length)`` of the block of ``outer`` that ``module`` is (or is
    inside), ``None`` when it is in no list of two or more same-class blocks."""
    return _site_map(outer).get(module)


def block_in_frames(frame) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(outer, block module)`` from the nearest frame holding a module, for a graph without module state
    (a resume function): that frame runs a block when its modules are known blocks of one outer model and
    none is the outer model itself."""
    for _ in range(_NEAR):
        if frame is None:
            return None
        modules = [unwrap(v) for v in list(frame.f_locals.values()) if isinstance(v, torch.nn.Module)]
        if modules:
            found = None
            for m in modules:
                if m in _SITES:
                    return None  # the outer model's own frame: not inside a block
                ref = _KNOWN.get(m)
                outer = ref() if ref is not None else None
                if outer is not None:
                    site = site_of(outer, m)
                    if found is not None and (found[0] is not outer or site_of(outer, found[1])[:2] != site[:2]):
                        return None
                    found = found or (outer, m)
            return found
        frame = frame.f_back
    return None


def call_frame(outer: torch.nn.Module, frame):
    """The innermost frame from ``frame`` up whose locals hold ``outer``: the frame of the denoiser call."""
    for _ in range(_DEPTH):
        if frame is None:
            return None
        if any(v is outer or (isinstance(v, torch.nn.Module) and unwrap(v) is outer)
               for v in list(frame.f_locals.values())):
            return frame
        frame = frame.f_back
    return None


def _on_stack(target, frame) -> bool:
    for _ in range(_DEPTH):
        if frame is None:
            return False
        if frame is target:
            return True
        frame = frame.f_back
    return False


# --- the decision of a call, and the fragments' caches ---------------------------------------------

@dataclass
class Decision:
    frame: Any  # the denoiser call's frame, held while the decision lives (no id reuse)
    branch: Any  # the leader's BranchState: its cache holds the fragments' entries
    step: int
    timestep: float | None
    compute: bool


@dataclass
class _Entry:
    layout: Any
    signature: tuple
    cache: ReuseCache


class FragmentCaches(ReuseCache):
    """A leader branch's cache plus its followers' entries: all dropped together with the branch, counted
    together in ``stats().branches[i].cache_bytes``."""

    def __init__(self, own: ReuseCache) -> None:
        self.own = own
        self.entries: dict[Any, _Entry] = {}

    def write(self, residuals, step):
        self.own.write(residuals, step)

    def read(self, step):
        return self.own.read(step)

    def ready(self):
        return self.own.ready()

    def note_time(self, step, timestep):
        self.own.note_time(step, timestep)

    def nbytes(self):
        return self.own.nbytes() + sum(e.cache.nbytes() for e in self.entries.values())


@dataclass
class Tracker:
    """Per outer model: the decision of the call running now and what the calls showed so far."""

    decision: Decision | None = None
    pending: Any = None  # the frame of the call a leader is deciding for
    seen: dict = field(default_factory=dict)  # fragment key -> occurrences in the current call
    leaders: int = 0  # calls led so far
    unled: Any = None  # while no call was ever led: the frame of the last call whose fragments ran
    reasons: list = field(default_factory=list)  # why a fragment cannot lead, first seen first
    #: the timestep inputs helper graphs received since the last leader, in call order (a few at most)
    timesteps: deque = field(default_factory=lambda: deque(maxlen=4))
    warned: bool = False

    def live(self, runtime: ModelRuntime, frame) -> Decision | None:
        d = self.decision
        if d is not None and runtime.branches.get(d.branch.name) is not d.branch:
            self.decision = d = None  # the request ended (or the branch started afresh): let go of its frame
        if d is None or not _on_stack(d.frame, frame):
            return None
        return d

    def begin(self, frame) -> None:
        self.decision, self.pending, self.seen = None, frame, {}

    def occurrence(self, key) -> tuple:
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        return key + (n,)

    def take_timestep(self):
        """The first timestep input a helper graph received since the last leader (in this call: the model's
        timestep embedding runs before its blocks), or ``None``; the others are dropped."""
        value = self.timesteps[0] if self.timesteps else None
        self.timesteps.clear()
        return timestep_key(value) if value is not None else None


_TRACKERS: "weakref.WeakKeyDictionary[ModelRuntime, Tracker]" = weakref.WeakKeyDictionary()


def tracker_of(runtime: ModelRuntime, create: bool = True) -> Tracker | None:
    tracker = _TRACKERS.get(runtime)
    if tracker is None and create:
        tracker = _TRACKERS[runtime] = Tracker()
    return tracker


def _no_leader(tracker: Tracker, runtime: ModelRuntime, outer, frame, reason: str) -> None:
    """A fragment ran without a decision. When a later call's fragment runs and no call was ever led, a whole
    call went uncached: warn once, and count each such call as uncached (its frame is held until the next)."""
    if reason not in tracker.reasons:
        tracker.reasons.append(reason)
    if tracker.leaders or runtime.counters:  # some graph of the model caches (a leader, or a whole stack)
        tracker.unled = None
        return
    call = call_frame(outer, frame)
    if call is None or call is tracker.unled:
        return
    first_call = tracker.unled is None
    tracker.unled = call
    if first_call:
        return
    why = tracker.reasons[0]
    if not tracker.warned:
        tracker.warned = True
        warn_once(log, ("fragments", id(outer)), "cachepass: caching is off for %s: %s. Its graphs run unchanged.",
                  type(outer).__name__, why)
    runtime.count_uncached(why)


# --- the programs ----------------------------------------------------------------------------------

def simple(requirements: Requirements) -> bool:
    """Whether a policy can decide in any fragment: no indicator, no observed tensor, no blocks always
    computed, residuals at granularity ``stack``."""
    return (requirements.indicator is None and not requirements.observe and not requirements.compute_first
            and not requirements.compute_last and requirements.reconstruction.granularity == "stack")


class _Located:
    """Finds the outer model and the block a call belongs to."""

    identity: InstanceIdentity
    site: tuple[str, int] | None  # fixed: a graph of the model's own frame (its first block)

    def _locate(self, args, frame):
        owner = self.identity.owner(args)
        if self.site is not None:
            if not isinstance(owner, torch.nn.Module):
                return None
            return owner, self.site[0], self.site[1]
        if isinstance(owner, torch.nn.Module):
            outer, module = outer_owner(owner, frame), owner
        else:
            found = block_in_frames(frame)
            if found is None:
                return None
            outer, module = found
        site = site_of(outer, module)
        if site is None:
            return None
        return outer, site[0], site[1]


class FragmentProgram(_Located, CachedProgram):
    """A fragment's program: head, compute, reuse as a :class:`CachedProgram`, leading the call's decision
    when it holds block 0 of its list and no fragment led the call yet (``can_lead``: built with the policy's
    requirements, or the policy needs none), else following it."""

    def __init__(self, *args, site: tuple[str, int] | None, can_lead: bool, reason: str, describe: str,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.site = site
        self.can_lead = can_lead
        self.reason = reason  # why it cannot lead (the warning when no fragment ever leads)
        self.describe = describe
        self._local = threading.local()  # the tracker of the call this thread runs (programs are shared)

    def _new_branch(self):
        return self.policy.new_state(), FragmentCaches(self.reconstruction.new_cache())

    def _timestep(self, args, signal):
        if self.timestep_index is not None:
            return super()._timestep(args, signal)
        tracker = self._local.tracker
        if not (signal is None or signal.step_index is None or self.policy.reads_timestep):
            tracker.timesteps.clear()
            return None
        return tracker.take_timestep()

    def _decided(self, branch, placement, ctx, compute):
        tracker = self._local.tracker
        tracker.decision = Decision(tracker.pending, branch, placement.step, ctx.timestep, compute)
        tracker.pending = None
        tracker.leaders += 1

    def __call__(self, *args):
        frame = sys._getframe(1)
        found = self._locate(args, frame)
        if found is None:
            return self._plain(args)
        outer, path, index = found
        runtime = runtime_for(outer)
        with runtime.lock:
            tracker = tracker_of(runtime)
            base = (self.layout, path, index)
            decision = tracker.live(runtime, frame)
            if decision is None and self.can_lead and index == 0:
                call = call_frame(outer, frame)
                if call is not None:
                    tracker.begin(call)
                    tracker.occurrence(base)
                    _watch(runtime, outer)
                    self._local.tracker = tracker
                    try:
                        out = self._run(runtime, signals.current_signal(outer), args,
                                        signals.loop_steps(outer))
                    finally:
                        self._local.tracker = None
                    return out
            if decision is None:
                _no_leader(tracker, runtime, outer, frame, self.reason)
                return self._plain(args)
            key = tracker.occurrence(base)
            return self._follow(decision, key, args)

    def _exported(self, args) -> tuple:
        head_out = tuple(self.head(*args))
        return head_out[1:] if self.has_indicator else head_out

    def _plain(self, args):
        return tuple(self.compute(*args, *self._exported(args))[:self.num_outputs])

    def _follow(self, decision: Decision, key, args):
        caches = decision.branch.cache
        if not isinstance(caches, FragmentCaches):
            return self._plain(args)
        signature = call_signature(args, self.input_indices)
        entry = caches.entries.get(key)
        if entry is not None and (entry.layout != self.layout or entry.signature != signature):
            entry = None
        exported = self._exported(args)
        n, r = self.num_outputs, self.num_cache_writes
        if decision.compute or entry is None or not entry.cache.ready():
            out = self.compute(*args, *exported)
            if self.reuses:
                if entry is None:
                    entry = caches.entries[key] = _Entry(self.layout, signature, self.reconstruction.new_cache())
                entry.cache.note_time(decision.step, decision.timestep)
                entry.cache.write(out[n:n + r], decision.step)
            return tuple(out[:n])
        entry.cache.note_time(decision.step, decision.timestep)
        return tuple(self.reuse(*args, *exported, *entry.cache.read(decision.step)))


class BlockPiece(_Located):
    """A graph inside a block of a split stack that pairs nothing: it always runs unchanged. It counts as
    uncached (and warns once) only when whole calls pass without any fragment leading; running inside a
    reused call, it says once that part of each block is not skipped, and how to keep the block whole."""

    def __init__(self, compiled: Callable, identity: InstanceIdentity, reason: str, where: str) -> None:
        self.compiled = compiled
        self.identity = identity
        self.reason = reason
        self.where = where
        self.site = None

    def __call__(self, *args):
        found = self._locate(args, sys._getframe(1))
        if found is not None:
            outer = found[0]
            runtime = runtime_for(outer)
            with runtime.lock:
                tracker = tracker_of(runtime)
                decision = tracker.live(runtime, sys._getframe(1))
                if decision is None:
                    _no_leader(tracker, runtime, outer, sys._getframe(1), self.reason)
                elif not decision.compute:
                    warn_once(log, ("pieces", id(outer)), NOT_SKIPPED, type(outer).__name__, self.where)
        return self.compiled(*args)


#: the warning of a block piece that runs inside a reused call
NOT_SKIPPED = (
    "cachepass: on reused steps of %s, graphs inside its blocks still run (%s, between graph breaks inside the "
    "block): the code between two graphs runs as Python, which no graph can skip, so those steps save less "
    "than the skipped blocks suggest. TORCH_LOGS=graph_breaks names the breaks; a data-dependent shape "
    "(nonzero, boolean masks) or a scalar read (.item()) stays in the graph with "
    "torch._dynamo.config.capture_dynamic_output_shape_ops = True or capture_scalar_outputs = True, set "
    "before the first call.")


class TimestepTap:
    """A helper graph of a model (no blocks) with a timestep input: a split stack's leader, which sees no
    timestep of its own, places its calls with the last one this graph received."""

    def __init__(self, compiled: Callable, identity: InstanceIdentity, index: int) -> None:
        self.compiled = compiled
        self.identity = identity
        self.index = index

    def __call__(self, *args):
        owner = self.identity.owner(args)
        if isinstance(owner, torch.nn.Module):
            runtime = runtime_for(outer_owner(owner, sys._getframe(1)), create=False)
            tracker = tracker_of(runtime, create=False) if runtime is not None else None
            if tracker is not None:
                tracker.timesteps.append(args[self.index])
        return self.compiled(*args)


# --- building them (the backend calls these when a graph holds part of a split stack) ---------------

def follower_requirements(requirements: Requirements) -> Requirements:
    """What a fragment that only follows needs: the policy's reconstruction, nothing to decide on."""
    return Requirements(indicator=None, reconstruction=requirements.reconstruction, reuses=requirements.reuses)


def _cannot_lead(settings, requirements: Requirements) -> str:
    needs = []
    if requirements.indicator is not None:
        needs.append(f"the indicator {requirements.indicator!r}")
    if requirements.observe:
        needs.append(f"observed tensors ({', '.join(requirements.observe)})")
    if requirements.compute_first or requirements.compute_last:
        needs.append("blocks always computed before or after the cached span")
    if requirements.reconstruction.granularity != "stack":
        needs.append(f"granularity {requirements.reconstruction.granularity!r}")
    return (f"policy {settings.policy_name!r} needs {' and '.join(needs)}, which the graphs of a block stack split "
            "by graph breaks into per-block graphs do not provide (policies that decide on the step alone, such "
            "as 'interval', cache it)")


def _list_text(outer, path: str) -> str:
    try:
        count = len(outer.get_submodule(path))
    except Exception:
        count = "?"
    return f"the block stack {path!r} ({count} blocks) of {type(outer).__name__}"


def split_graph_program(gm, example_inputs, settings, root, identity: InstanceIdentity, state) -> Callable | None:
    """A graph of the model's own frame holding some blocks of a list split by graph breaks (``SplitStack``):
    its program as a fragment (``None``: it cannot be one; the backend falls back)."""
    from ..analysis.values import source_name
    from ..backend import settings_key, signature_inputs
    from ..errors import UnsupportedStructure
    from ..stages import ANALYSIS, COMPILE, TRANSFORM, PassState, run_stages

    if root is None:
        return None
    new = PassState(gm, None, example_inputs=example_inputs, inner=settings.inner,
                    inductor_mode=settings.inductor_mode)
    try:
        run_stages(new, ANALYSIS)
    except UnsupportedStructure as exc:
        log.debug("cachepass: a fragment of a split stack cannot be analysed: %s", exc)
        return None
    requirements = settings.policy.requirements()
    first = new.stacks[0].blocks[0].module
    leads = first.index == 0
    options = [(requirements, leads)] if leads else []
    if not leads or not simple(requirements):
        options.append((follower_requirements(requirements), False))
    chosen = can_lead = None
    reason = _cannot_lead(settings, requirements)
    for option, lead in options:
        new.requirements = option
        try:
            run_stages(new, TRANSFORM)
        except UnsupportedStructure as exc:
            log.debug("cachepass: a fragment of a split stack: %s", exc)
            if lead:
                reason = (f"the graph holding the first block of {_list_text(root, first.parent)} cannot be cut "
                          f"for policy {settings.policy_name!r}: {getattr(exc, 'reason', exc)}")
            continue
        chosen, can_lead = option, lead
        break
    if chosen is None:
        return None
    run_stages(new, (COMPILE,))
    structure, variants, pieces = new.structure, new.variants, dict(new.pieces)
    if not chosen.reuses:
        pieces["reuse"] = _never
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    t = structure.timestep_input
    key = settings_key(settings)
    names = [b.module.qualified_name for b in structure.blocks]
    describe = (f"fragment of {_list_text(root, first.parent)}: blocks {names[0]} .. {names[-1]} in the model's own "
                f"graph; {'leads the call (holds its first block)' if can_lead else 'follows the call'}")
    program = FragmentProgram(
        pieces["head"], pieces["compute"], pieces["reuse"],
        policy=settings.policy, reconstruction=chosen.reconstruction, settings_key=key, num_steps=settings.num_steps,
        sync=_sync(settings), branches=settings.branches, identity=identity, input_indices=signature_inputs(placeholders),
        has_indicator=variants.has_indicator, num_outputs=variants.num_outputs,
        num_cache_writes=variants.num_cache_writes,
        timestep_index=placeholders.index(t) if t is not None else None, reuses=chosen.reuses,
        layout=(key, "fragment", variants.num_outputs, variants.num_cache_writes, variants.has_indicator,
                tuple(names), tuple(source_name(s.input) for s in structure.stream)),
        site=(first.parent, first.index), can_lead=can_lead, reason=reason,
        describe=describe,
    )
    stream = ", ".join(s.start_name for s in structure.stream)
    state.__dict__.update({k: v for k, v in new.__dict__.items() if k != "root"})
    state.outcome = f"caching: on ({describe})"
    log.info("cachepass: policy %r on a %s; stream %s", settings.policy_name, describe, stream)
    return program


def _sync(settings):
    from .distributed import DecisionSync

    return DecisionSync(settings.sync, settings.process_group)


def _never(*args):
    raise AssertionError("cachepass: the policy declared it never reuses, yet a reuse was requested")


def _no_head(*args):
    return ()


def block_graph_program(gm, example_inputs, settings, root, outer, identity: InstanceIdentity,
                        state) -> Callable | None:
    """A graph compiled for a block's own frame (its root is the block or a module inside one, or it has no
    module state): a :class:`FragmentProgram` when it pairs a residual, a :class:`BlockPiece` when it pairs
    none; ``None`` when it is not inside a block of a list of ``outer``."""
    from ..analysis.values import is_user_input, source_name
    from ..backend import settings_key, signature_inputs
    from ..errors import UnsupportedStructure
    from ..transform.compile import compile_piece, example_inputs_for
    from ..transform.fragments import build_fragment_graphs, find_pairs

    if outer is None or outer is root:
        return None
    if root is not None:
        site = site_of(outer, root)
        if site is None:
            return None
        where = f"block {site[1]} of {_list_text(outer, site[0])}"
    else:
        _site_map(outer)
        where = f"a block of {type(outer).__name__} (found per call from the calling frames)"
    pairs = find_pairs(gm)
    requirements = settings.policy.requirements()
    can_lead = simple(requirements)
    reason = (_cannot_lead(settings, requirements) if not can_lead else
              f"no graph of {where.split(' of ', 1)[-1]} carries the residual stream (an output that is an input "
              "plus a residual): a graph break splits it into pieces that run uncached")
    if not pairs:
        if root is None:
            return None  # not known to be inside a block: a helper graph
        compiled = compile_piece(gm, example_inputs, settings.inner, settings.inductor_mode)
        state.outcome = f"caching off: {where}: the graph pairs no input with an output (it always runs)"
        log.debug("cachepass: %s: a graph that pairs nothing; it runs unchanged", where)
        return BlockPiece(compiled, identity, reason, where)
    chosen = requirements if can_lead else follower_requirements(requirements)
    try:
        graphs = build_fragment_graphs(gm, pairs if chosen.reuses else [], chosen)
    except UnsupportedStructure as exc:
        log.debug("cachepass: %s: %s", where, exc)
        return None
    compute = compile_piece(graphs.compute, example_inputs_for(graphs.compute, example_inputs), settings.inner,
                            settings.inductor_mode)
    reuse = _never
    if chosen.reuses:
        reuse = compile_piece(graphs.reuse, example_inputs_for(graphs.reuse, example_inputs), settings.inner,
                              settings.inductor_mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    key = settings_key(settings)
    shown = ", ".join(f"{p.input_name} -> {p.output_name}" for p in pairs)
    describe = f"fragment: {where}; residual pair(s) {shown}"
    program = FragmentProgram(
        _no_head, compute, reuse, policy=settings.policy, reconstruction=chosen.reconstruction, settings_key=key,
        num_steps=settings.num_steps, sync=_sync(settings), branches=settings.branches, identity=identity,
        input_indices=signature_inputs(placeholders), has_indicator=False, num_outputs=graphs.num_outputs,
        num_cache_writes=graphs.num_cache_writes, timestep_index=None, reuses=chosen.reuses,
        layout=(key, "block graph", graphs.num_outputs, graphs.num_cache_writes,
                tuple(source_name(p) for p in placeholders if is_user_input(p)),
                tuple((p.input, p.output) for p in pairs)),
        site=None, can_lead=can_lead, reason=reason, describe=describe,
    )
    state.outcome = f"caching: on ({describe})"
    log.info("cachepass: policy %r on a %s", settings.policy_name, describe)
    return program


def helper_program(gm, compiled: Callable, identity: InstanceIdentity) -> Callable:
    """A helper graph (no blocks) of a model with a block stack: a :class:`TimestepTap` when it has a
    timestep input (a split stack's leader places its calls with it), else ``compiled`` itself."""
    from ..analysis.dataflow import to_networkx
    from ..analysis.timestep import find_timestep_input

    if identity.index is None:
        return compiled
    try:
        t = find_timestep_input(gm, to_networkx(gm.graph))
    except Exception:  # no timestep to be found in a graph it cannot read
        return compiled
    if t is None:
        return compiled
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return TimestepTap(compiled, identity, placeholders.index(t))


def describe_graph(gm, root, outer, settings, error) -> tuple[bool, str] | None:
    """What a graph the analysis declined (``error``) is as a fragment of a split stack, in words: ``(whether
    it caches, the description)``, or ``None`` when it is none (``cachepass.explain``; nothing is compiled)."""
    from ..errors import NoBlockStack, SplitStack, UnsupportedStructure
    from ..stages import ANALYSIS, PassState, run_stages
    from ..transform.fragments import find_pairs

    requirements = settings.policy.requirements()
    if isinstance(error, SplitStack) and root is not None:  # the model's own frame, split by graph breaks
        state = PassState(gm, None)
        try:
            run_stages(state, ANALYSIS)
        except UnsupportedStructure as exc:
            return False, f"holds blocks of a split stack but cannot be a fragment: {exc}"
        stack = state.stacks[0]
        names = [b.module.qualified_name for b in state.structure.blocks]
        first = stack.blocks[0].module.index
        role = ("it holds the list's first block: it leads each call's decision" if first == 0 else
                "it follows the decision of the call's first fragment")
        stream = ", ".join(s.start_name for s in state.structure.stream)
        return True, (f"the model's own graph, cut by a graph break, holding blocks {names[0]} .. {names[-1]} of "
                      f"{_list_text(root, stack.parent)}; stream {stream}; {role}")
    if not isinstance(error, NoBlockStack) or outer is None or root is None or outer is root:
        return None
    site = site_of(outer, root)
    if site is None:
        return None
    path, index, count = site
    pairs = find_pairs(gm)
    try:
        own = outer.get_submodule(path)[index] is root
    except Exception:
        own = False
    frame_of = f"block {index}'s own frame" if own else f"the frame of a {type(root).__name__} inside block {index}"
    where = (f"a graph of {frame_of} of {_list_text(outer, path)} (a graph break in the loop over the blocks makes "
             f"Dynamo compile each block's forward on its own; it serves every block of the class whose guards pass: "
             f"explain shows it once, traced for block {index})")
    if not pairs:
        return False, (f"{where}; it pairs no input with an output (nothing reaches an input through additions "
                       "alone): it always computes")
    shown = ", ".join(f"{p.input_name} -> {p.output_name}" for p in pairs)
    role = ("block 0 leads each call's decision, the other blocks follow it" if simple(requirements) else
            f"no block can lead a call: {_cannot_lead(settings, requirements)}")
    return simple(requirements), f"{where}; residual pair(s) {shown}; {role}"
