"""Recording: the user's generations with every step computed, and per branch and step what a fit needs.

The user's model is compiled in place for the duration (its ``_compiled_call_impl``, what
``nn.Module.compile`` sets) with the cachepass backend and a recording policy that always computes and
observes the first stream tensor entering and leaving the block stack plus the indicator candidates.
Afterwards the model, Dynamo's cache for the wrapper and cachepass's registry are put back as they were,
so calibrating leaves nothing behind.

Per branch (cond, uncond) and step the recording keeps: each indicator's relative L1 change against the previous step
(what TeaCache accumulates), the stack output's mean magnitude, MagCache's magnitude ratio of successive
residuals, and, for every earlier step ``t0`` within ``window`` steps, ``mean|R_t - R_t0|``: the error
reusing ``t0``'s residual at step ``t`` makes in the stack output (``R = output - input`` of the stack).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .._deprecation import renamed_attribute, renamed_keywords
from .._dynamo import reset_code, unwrap
from .._logging import get_logger
from ..backend import compile_with_settings
from ..errors import OptionError
from ..options import Settings
from ..policies.base import CallContext, Policy, PolicyConfig, Requirements
from ..policies.distance import relative_l1
from ..runtime import state as runtime_state
from .profile import ModelFingerprint

log = get_logger(__name__)

#: The indicators TeaCache can decide on; calibration records every one the model provides.
INDICATOR_CANDIDATES = ("timestep_embedding", "modulated_input")


@renamed_keywords({"stream": "branch_index"})
@dataclass
class Trajectory:
    """One branch (cond, uncond) of one recorded generation, every step computed. ``branch_index`` is the
    branch's rank in the generation (``CallContext.branch_index``); ``stream`` (deprecated) is the same."""

    generation: int
    branch_index: int
    window: int
    timesteps: list[float | None] = field(default_factory=list)
    indicator_change: dict[str, list[float]] = field(default_factory=dict)  # step 0: nan
    output_mean: list[float] = field(default_factory=list)  # mean|stack output|
    magnitude_ratio: list[float] = field(default_factory=list)  # step 0: 1.0
    reuse_abs: dict[tuple[int, int], float] = field(default_factory=dict)  # (t0, t): mean|R_t - R_t0|

    @property
    def num_steps(self) -> int:
        return len(self.output_mean)

    def _abs_error(self, t0: int, t: int) -> float:
        if t == t0:
            return 0.0
        if (t0, t) in self.reuse_abs:
            return self.reuse_abs[(t0, t)]
        mid = t0 + self.window  # beyond the window: triangle-inequality bound through recorded spans
        return self.reuse_abs[(t0, mid)] + self._abs_error(mid, t)

    def reuse_error(self, t0: int, t: int) -> float:
        """Relative L1 error of the stack output at step ``t`` when step ``t0``'s residual is reused
        (``mean|R_t - R_t0| / mean|output_t|``); an upper bound for spans longer than ``window``."""
        return self._abs_error(t0, t) / max(self.output_mean[t], 1e-30)

    def step_change(self) -> list[float]:
        """Per step from 1: the error of reusing the previous step's residual (TeaCache's fit target)."""
        return [self.reuse_error(t - 1, t) for t in range(1, self.num_steps)]

    stream = renamed_attribute("branch_index", "Trajectory.stream", "Trajectory.branch_index")


@dataclass
class Recording:
    """What :func:`record` returns: the trajectories (generation-major, branch-minor) and the model's outputs.
    ``num_branches``: the branches per generation (``streams``, deprecated, is the same)."""

    trajectories: list[Trajectory]
    num_steps: int
    indicators: tuple[str, ...]
    window: int
    model: ModelFingerprint
    outputs: list[torch.Tensor | None]  # per generation, the output of ``run`` (its tensor), for checks

    @property
    def num_branches(self) -> int:
        return max(t.branch_index for t in self.trajectories) + 1

    streams = renamed_attribute("num_branches", "Recording.streams", "Recording.num_branches")


# --- the recording policy ------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordConfig(PolicyConfig):
    window: int = 8
    indicators: tuple[str, ...] = ()


@dataclass
class _BranchRecorder:
    trajectory: Trajectory | None = None
    previous: dict[str, torch.Tensor] = field(default_factory=dict)
    residuals: deque = field(default_factory=deque)  # (step, residual), newest last


class RecordingPolicy(Policy):
    """Computes every call and records the statistics above; not an option value (calibration only)."""

    name = "record"
    config_class = RecordConfig
    reads_timestep = True  # the trajectories keep the timesteps

    def __init__(self, config: RecordConfig) -> None:
        super().__init__(config)
        self.trajectories: list[Trajectory] = []

    def requirements(self) -> Requirements:
        observe = ("stream_input", "stream_output", *(f"indicator:{i}" for i in self.config.indicators))
        return Requirements(indicator=None, observe=observe, reuses=False)

    def new_state(self) -> _BranchRecorder:
        return _BranchRecorder(residuals=deque(maxlen=self.config.window))

    def decide(self, state, ctx: CallContext, indicator) -> bool:
        return True

    def after_compute(self, state: _BranchRecorder, ctx: CallContext, observed: dict[str, torch.Tensor]) -> None:
        if state.trajectory is None:
            state.trajectory = Trajectory(ctx.generation, ctx.branch_index, self.config.window,
                                          indicator_change={i: [] for i in self.config.indicators})
            self.trajectories.append(state.trajectory)
        traj = state.trajectory
        stream_in, stream_out = observed["stream_input"], observed["stream_output"]
        residual = stream_out.detach() - stream_in.detach()
        traj.timesteps.append(ctx.timestep)
        traj.output_mean.append(stream_out.detach().float().abs().mean().item())
        for name in self.config.indicators:
            value = observed[f"indicator:{name}"]
            before = state.previous.get(name)
            traj.indicator_change[name].append(math.nan if before is None else relative_l1(value, before))
            state.previous[name] = value.detach().clone()
        if state.residuals:
            before = state.residuals[-1][1].float()
            ratio = residual.float().norm(dim=-1) / (before.norm(dim=-1) + 1e-8)
            traj.magnitude_ratio.append(ratio.mean().item())
        else:
            traj.magnitude_ratio.append(1.0)
        step = len(traj.output_mean) - 1
        for t0, old in state.residuals:
            traj.reuse_abs[(t0, step)] = (residual.float() - old.float()).abs().mean().item()
        state.residuals.append((step, residual))


class _RecordingBackend:
    """A Dynamo backend: the cachepass pass with the recording policy, observing the indicators found.

    The policy is made once the analysis stages have run (``configure``): each graph is analysed once."""

    def __init__(self, window: int, indicators: tuple[str, ...], inner) -> None:
        self.window, self.indicators, self.inner = window, indicators, inner
        self.policies: list[RecordingPolicy] = []

    def _settings(self, available: tuple[str, ...]) -> Settings:
        return Settings(policy=RecordingPolicy(RecordConfig(self.window, available)), inner=self.inner)

    def __call__(self, gm, example_inputs):
        used = [self._settings(())]  # what a graph the analysis rejects falls back with

        def configure(structure) -> Settings:
            used[0] = self._settings(tuple(i for i in self.indicators if i in structure.indicators))
            return used[0]

        program = compile_with_settings(gm, example_inputs, used[0], configure=configure)
        self.policies.append(used[0].policy)
        return program


# --- compiling the user's model in place, and undoing it ------------------------------------------

def _call_module(module, *args, **kwargs):
    return module._call_impl(*args, **kwargs)


_UNSET = object()


def plain_module(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"calibration needs the denoiser module (e.g. pipe.transformer), got {type(model).__name__}")
    return unwrap(model)


@contextlib.contextmanager
def intercept(model: torch.nn.Module, backend) -> Iterator[None]:
    """Route ``model``'s calls through ``torch.compile(backend=backend)`` inside the block; afterwards
    ``model`` is called as before, Dynamo's entries for the wrapper are dropped and cachepass's registry
    holds what it held before (stats of the user's own compiled model stay untouched)."""
    before = runtime_state._RUNTIMES.pop(model, None)  # the user's own state stays out of the recording
    call = model.__dict__.get("_compiled_call_impl", _UNSET)
    model._compiled_call_impl = functools.partial(torch.compile(_call_module, backend=backend), model)
    try:
        yield
    finally:
        if call is _UNSET:
            del model.__dict__["_compiled_call_impl"]
        else:
            model._compiled_call_impl = call
        reset_code(_call_module.__code__)
        runtime_state._RUNTIMES.pop(model, None)
        if before is not None:
            runtime_state._RUNTIMES[model] = before


def call_run(run: Callable, generation: int):
    """``run()`` or ``run(generation)``, whichever the callable takes (a callable taking an index can vary
    prompts or seeds between recorded generations and replay generation 0 for the check)."""
    try:
        takes_index = bool(inspect.signature(run).parameters)
    except (TypeError, ValueError):
        takes_index = False
    with torch.no_grad():
        return run(generation) if takes_index else run()


def output_tensor(result: Any) -> torch.Tensor | None:
    """The tensor in what ``run`` returned: a tensor, an array, ``.frames`` / ``.images`` / ``.sample``
    of a pipeline output, or the first element of a tuple or list; ``None`` if there is none."""
    if isinstance(result, torch.Tensor):
        return result.detach()
    if type(result).__module__ == "numpy":
        try:
            return torch.as_tensor(result)
        except (TypeError, RuntimeError):
            return None
    for attr in ("frames", "images", "sample", "latents"):
        if hasattr(result, attr):
            return output_tensor(getattr(result, attr))
    if isinstance(result, (tuple, list)) and result:
        return output_tensor(result[0])
    return None


def record(run: Callable, model: torch.nn.Module, *, generations: int = 1, window: int = 8,
           indicators: tuple[str, ...] = INDICATOR_CANDIDATES, inner="eager") -> Recording:
    """Run ``run`` ``generations`` times with every step of ``model`` computed and record the trajectories.

    ``run`` must make ``model`` do one whole generation (e.g. ``lambda: pipe(prompt, ...)``) on the module
    passed here, not on a ``torch.compile`` wrapper of it: compile after calibrating."""
    model = plain_module(model)
    if generations < 1 or window < 1:
        raise OptionError(f"generations and window must be >= 1, got {generations} and {window}")
    backend = _RecordingBackend(window, tuple(indicators), inner)
    outputs = []
    runtime = None
    with intercept(model, backend):
        for g in range(generations):
            outputs.append(output_tensor(call_run(run, g)))
            runtime = runtime_state.runtime_for(model, create=False)
            if runtime is not None:  # the next run is a new generation even without a timestep input
                runtime.reset()
        reasons = list(runtime.fallback_reasons) if runtime is not None else []
    trajectories = [t for p in backend.policies for t in p.trajectories]
    if not trajectories:
        why = reasons[-1] if reasons else (
            "the model was never called: pass the module the pipeline calls (pipe.transformer), uncompiled")
        raise OptionError(f"calibration recorded nothing: {why}")
    steps = {t.num_steps for t in trajectories}
    if len(steps) != 1:
        raise OptionError(f"calibration needs every recorded generation to have the same number of steps, got "
                          f"{sorted(steps)}; run the same step count each time")
    found = tuple(i for i in indicators if i in trajectories[0].indicator_change)
    log.info("calibration: recorded %d branch(es) x %d generation(s) of %d steps; indicators %s",
             len({t.branch_index for t in trajectories}), generations, trajectories[0].num_steps, found)
    return Recording(trajectories, trajectories[0].num_steps, found, window, ModelFingerprint.of(model), outputs)
