"""What diffusers pipelines tell a denoiser about each call, read without changing the pipeline.

diffusers pipelines wrap every denoiser call in ``model.cache_context(name, **fields)`` (the branch,
``"cond"`` / ``"uncond"``; WanPipeline also the step index and step count), open the denoising loop with
``self.progress_bar(total=num_inference_steps)`` and end every pipeline call with
``maybe_free_model_hooks()``, which calls ``model._reset_stateful_cache()``. Three taps receive them:

* ``cache_context`` reaches the model through ``diffusers.hooks.hooks._set_cache_context``; cachepass
  wraps that function once, at import, to remember the context per module (weakly) and then runs the
  original unchanged. The wrap sees the context of the very first call, before anything was compiled,
  which a hook registered at compile time could not.
* the end of a pipeline call is diffusers' ``CacheMixin._reset_stateful_cache``; cachepass wraps that
  method once, at import, to tell the modules it watches (weakly) after the original ran. Nothing is
  added to the module: a ``HookRegistry`` attribute would change what the traced ``forward`` sees
  (diffusers' ``self.dtype`` asks every submodule ``hasattr(m, "_diffusers_hook")``, and Dynamo guards
  on that answer, so adding one after the first compile recompiles the model). A class with its own
  ``_reset_stateful_cache`` gets a stateful hook in its registry instead (:class:`RequestEndHook`), which
  wraps nothing.
* the step count of a pipeline whose ``cache_context`` states none (FluxPipeline), or that sets no
  ``cache_context`` at all (StableDiffusion3Pipeline, PixArt, the U-Net pipelines), is the ``total`` of
  ``DiffusionPipeline.progress_bar``, wrapped once the pipeline module is imported. It is taken only
  when the pipeline's scheduler confirms it (one call per timestep: ``scheduler.order`` 1, and
  ``len(scheduler.timesteps)`` or the pipeline's ``_num_timesteps`` equal to it), and it holds for the
  pipeline's own modules while that loop runs: until its bar closes (the end of the ``with`` block, or
  the bar's collection) or the pipeline call ends. A count that is wrong could only make a policy
  compute more: a schedule computes its "last" step early, and a branch that runs past the count
  starts afresh.

Where diffusers is missing or has neither entry point, both taps stay off and placement falls back to
the timesteps (:mod:`cachepass.runtime.placement`).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .._logging import get_logger

log = get_logger(__name__)

HOOK_NAME = "cachepass_request_end"


@dataclass(frozen=True)
class PipelineSignal:
    """One call's context as the pipeline stated it (``None`` fields: not stated)."""

    branch: str
    step_index: int | None = None
    num_steps: int | None = None


_CONTEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, PipelineSignal | None]" = weakref.WeakKeyDictionary()
_installed = False


class _LoopCount(int):
    """A confirmed progress-bar total; one object per denoising loop, so only its own bar forgets it."""


#: per module: the step count its pipeline's progress bar stated for the denoising loop now running
_LOOP_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, _LoopCount]" = weakref.WeakKeyDictionary()


def loop_steps(module) -> int | None:
    """The step count of the denoising loop now running ``module``, from its pipeline's progress bar
    (``None``: no loop, or one its scheduler did not confirm). Stated between the bar's opening and its
    closing (the end of the ``with`` block, or the bar's collection) or the end of the pipeline call."""
    if not isinstance(module, torch.nn.Module):
        return None
    count = _LOOP_STEPS.get(module)
    return None if count is None else int(count)


def _count(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _as_signal(context) -> PipelineSignal | None:
    """What the ``cache_context`` states; a loop's progress-bar count reaches placement on its own
    (:func:`loop_steps`, read per call by the programs)."""
    if context is None:
        return None
    name = getattr(context, "name", context)
    step = getattr(context, "step_index", None)
    return PipelineSignal(
        str(name),
        int(step) if isinstance(step, int) and not isinstance(step, bool) else None,
        _count(getattr(context, "num_inference_steps", None)),
    )


def install() -> bool:
    """Wrap diffusers' ``_set_cache_context`` (once per process); ``False`` when it is not there."""
    global _installed
    if _installed:
        return True
    try:
        from diffusers.hooks import hooks as diffusers_hooks
    except Exception:  # diffusers absent or broken: timestep inference only
        return False
    original = getattr(diffusers_hooks, "_set_cache_context", None)
    if original is None:
        log.debug("cachepass: this diffusers has no _set_cache_context; branch and step come from timesteps")
        return False
    if getattr(original, "__cachepass_tap__", False):
        _installed = True
        return True

    @functools.wraps(original)
    def _set_cache_context(module, context):
        result = original(module, context)
        try:
            _CONTEXTS[module] = _as_signal(context)
        except TypeError:  # a module that cannot be weakly referenced: no signal for it
            pass
        return result

    _set_cache_context.__cachepass_tap__ = True
    diffusers_hooks._set_cache_context = _set_cache_context
    _tap_request_end()
    _tap_progress_bar()
    _installed = True
    return True


#: the modules whose pipeline-call end cachepass watches, and what to call then
_END_WATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, Callable[[torch.nn.Module], None]]" = (
    weakref.WeakKeyDictionary())


def _tap_request_end() -> None:
    """Wrap ``CacheMixin._reset_stateful_cache`` (once): after the original, tell the watched modules it
    reached (``self``, and with ``recurse`` its submodules, as the registries' reset does)."""
    try:
        from diffusers.models.cache_utils import CacheMixin
    except Exception:
        return
    original = CacheMixin.__dict__.get("_reset_stateful_cache")
    if original is None or getattr(original, "__cachepass_tap__", False):
        return

    @functools.wraps(original)
    def _reset_stateful_cache(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        recurse = kwargs.get("recurse", args[0] if args else True)
        _LOOP_STEPS.pop(self, None)  # the pipeline call ended: its loop's step count with it
        if _END_WATCHERS:
            for module in (self.modules() if recurse else (self,)):
                on_end = _END_WATCHERS.get(module)
                if on_end is not None:
                    on_end(module)
        return result

    _reset_stateful_cache.__cachepass_tap__ = True
    CacheMixin._reset_stateful_cache = _reset_stateful_cache


def confirmed_loop_steps(pipeline, total) -> int | None:
    """``total`` when the pipeline's scheduler confirms it is the number of denoiser steps to come: one
    call per timestep (``scheduler.order`` 1) and ``len(scheduler.timesteps)`` or the pipeline's
    ``_num_timesteps`` equal to it; else ``None`` (a progress bar over something else: refinement
    blocks, an img2img tail the scheduler does not list, a second-order scheduler's two calls a step)."""
    total = _count(total)
    scheduler = getattr(pipeline, "scheduler", None)
    if total is None or scheduler is None or getattr(scheduler, "order", 1) != 1:
        return None
    timesteps = getattr(scheduler, "timesteps", None)
    try:
        listed = len(timesteps) if timesteps is not None else None
    except TypeError:
        listed = None
    return total if total in (listed, _count(getattr(pipeline, "_num_timesteps", None))) else None


def _pipeline_modules(pipeline):
    """The pipeline's ``nn.Module`` components (its instance attributes: reading config entries through
    the pipeline would warn), each as the module its ``cache_context`` reaches (the original of a
    ``torch.compile`` wrapper)."""
    for component in list(vars(pipeline).values()):
        if isinstance(component, torch.nn.Module):
            yield getattr(component, "_orig_mod", component)


PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"


def _tap_progress_bar() -> None:
    """Wrap ``DiffusionPipeline.progress_bar`` once its module is imported (importing it here would add
    two seconds to ``import cachepass``, for users without pipelines too): now if it is loaded, else
    right after its import (:class:`_AfterImport`)."""
    module = sys.modules.get(PIPELINE_MODULE)
    if module is not None:
        _wrap_progress_bar(module)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds :data:`PIPELINE_MODULE` with the other finders and runs :func:`_wrap_progress_bar` after the
    module body; then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != PIPELINE_MODULE:
            return None
        try:
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
        except Exception:  # never in the way of diffusers' own import: the other finders take it from here
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_body = spec.loader.exec_module

        def exec_module(module):
            run_body(module)
            try:
                _wrap_progress_bar(module)
            except Exception as exc:  # no count from progress bars; the import itself stands
                log.debug("cachepass: DiffusionPipeline.progress_bar not tapped (%s)", exc)

        spec.loader.exec_module = exec_module
        return spec


def _wrap_progress_bar(pipeline_utils) -> None:
    """A confirmed ``total`` (:func:`confirmed_loop_steps`; the length of ``iterable`` when the bar is
    over one, ``self.progress_bar(timesteps)``) becomes the step count of the pipeline's modules while
    the loop runs (:func:`_forget_on_close`)."""
    cls = getattr(pipeline_utils, "DiffusionPipeline", None)
    original = getattr(cls, "__dict__", {}).get("progress_bar")
    if original is None or getattr(original, "__cachepass_tap__", False):
        return

    @functools.wraps(original)
    def progress_bar(self, iterable=None, total=None):
        result = original(self, iterable=iterable, total=total)
        try:
            if total is None and iterable is not None and hasattr(iterable, "__len__"):
                total = len(iterable)
            steps = confirmed_loop_steps(self, total)
            count = None if steps is None else _LoopCount(steps)
            modules = list(_pipeline_modules(self))
            for module in modules:
                if count is None:
                    _LOOP_STEPS.pop(module, None)
                else:
                    _LOOP_STEPS[module] = count
            if count is not None:
                _forget_on_close(result, modules, count)
        except Exception as exc:  # never let the tap break a pipeline: no count, as before
            log.debug("cachepass: no step count from %s's progress bar (%s)", type(self).__name__, exc)
        return result

    progress_bar = torch.compiler.disable(progress_bar)  # as the original is: Dynamo never traces it
    progress_bar.__cachepass_tap__ = True
    cls.progress_bar = progress_bar


def _forget_on_close(bar, modules, count: _LoopCount) -> None:
    """When the bar closes (its ``with`` block ends, or it is collected), its count stops holding for
    ``modules``: a model called after the loop, outside any pipeline, has no step count."""
    close = getattr(bar, "close", None)
    if not callable(close):
        return
    refs = [weakref.ref(m) for m in modules]

    def close_and_forget(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            for ref in refs:
                module = ref()
                if module is not None and _LOOP_STEPS.get(module) is count:
                    del _LOOP_STEPS[module]

    try:
        bar.close = close_and_forget
    except (AttributeError, TypeError):
        pass


def current_signal(module) -> PipelineSignal | None:
    """The context the pipeline set around the call now running on ``module`` (``None``: none)."""
    if module is None or not isinstance(module, torch.nn.Module):
        return None
    return _CONTEXTS.get(module)


def watch_request_end(module, on_end: Callable[[torch.nn.Module], None]) -> bool:
    """Make ``module._reset_stateful_cache()`` (the end of every pipeline call) call ``on_end(module)``.

    Through the tapped ``CacheMixin`` method when the module's class inherits it (nothing is added to the
    module); else a stateful hook goes into the module's ``HookRegistry`` at the front, without wrapping
    ``forward``."""
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "_reset_stateful_cache"):
        return False
    if getattr(type(module)._reset_stateful_cache, "__cachepass_tap__", False):
        try:
            _END_WATCHERS[module] = on_end
            return True
        except TypeError:  # not weakly referable: the registry hook below
            pass
    try:
        from diffusers.hooks.hooks import HookFunctionReference, HookRegistry, ModelHook
    except Exception:
        return False
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        return True

    class RequestEndHook(ModelHook):
        """Stateful, so ``reset_stateful_hooks`` reaches it; it changes no forward."""

        _is_stateful = True

        def reset_state(self, module):
            on_end(module)
            return module

    hook = RequestEndHook()
    reference = HookFunctionReference()  # what remove_hook expects; never in the forward chain
    reference.forward = reference.original_forward = module.forward
    reference.pre_forward, reference.post_forward = hook.pre_forward, hook.post_forward
    hook.fn_ref = reference
    # first in the order: removing any other hook then rewires that hook's neighbours, never ours
    registry.hooks[HOOK_NAME] = hook
    registry._hook_order.insert(0, HOOK_NAME)
    registry._fn_refs.insert(0, reference)
    return True
