"""The one place options are declared, defaulted and validated.

``torch.compile(m, backend="cachepass", options={...})`` and ``cachepass.backend(**options)`` both end
here, so the option names are the same on both routes. Validation happens before any analysis or
compilation; every error is an :class:`~cachepass.errors.OptionError` (a ``ValueError``) naming the option
(or the profile file and field) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import OptionError
from .policies import POLICIES, Policy
from .policies.base import MAX_STEPS, Invalid, integer, native, show
from .runtime.distributed import validate_sync_options

#: TaylorSeer at interval 4: a fixed schedule needs no coefficients fitted on one model, and it holds on
#: both embedded models (Wan 50 steps: 14/50 computed, FLUX 28 steps: 8/28, both above 40 dB from the
#: first generation; docs/policies.md). TeaCache's Wan-fitted coefficients computed the wrong steps on
#: the FLUX model (21 dB at 32 %).
DEFAULT_POLICY = "taylorseer"
INNER_CHOICES = ("inductor", "eager")
DECISIONS_CHOICES = ("host", "device")
#: "together": in each step the first branch (cond) decides and the others follow, each on its own cache
#: (as one batched CFG call would); "apart": every branch decides on its own indicator
BRANCHES_CHOICES = ("together", "apart")

#: Options every policy accepts; everything else belongs to the chosen policy's config.
COMMON_OPTIONS = ("policy", "inner", "num_steps", "sync", "process_group", "debug_dir", "decisions", "branches")


@dataclass(frozen=True)
class Settings:
    """Validated options: what the pass and the runtime read."""

    policy: Policy
    inner: str | Callable
    num_steps: int | None = None
    inductor_mode: str | None = None  # torch.compile(mode=...), passed on to inductor
    #: Sum decision statistics over the ranks ("auto": when torch.distributed runs > 1 rank). On by
    #: default because sequence-parallel ranks that decide apart hang; data-parallel serving opts out.
    sync: bool | str = "auto"
    process_group: Any = None  # the group the tokens are sharded over; None: the default group
    debug_dir: str | None = None  # per compiled graph, a folder of graph dumps here (cachepass.graph_dump)
    #: "host": the policy decides in Python between the compiled pieces; "device": one compiled step graph
    #: decides with torch.cond, its state on the device (runtime/device_program.py)
    decisions: str = "host"
    #: "together": the later CFG branches of a step take the first branch's decision (never its data);
    #: "apart": each decides alone (runtime/program.py)
    branches: str = "together"

    @property
    def policy_name(self) -> str:
        return self.policy.name


def _validate_inner(inner: Any) -> str | Callable:
    if isinstance(inner, str):
        if inner in INNER_CHOICES:
            return inner
        if inner == "cachepass":
            raise OptionError("option 'inner' cannot be 'cachepass' itself")
        from ._dynamo import list_backends, lookup_backend

        try:
            lookup_backend(inner)
        except Exception:
            names = sorted(set(INNER_CHOICES) | set(list_backends()) - {"cachepass"})
            raise OptionError(f"option 'inner' must be one of {', '.join(map(repr, names))} or a callable; "
                              f"got {show(inner)}") from None
        return inner
    if callable(inner) and not isinstance(inner, type):
        return inner
    raise OptionError(f"option 'inner' must be 'inductor', 'eager', a backend name or a callable "
                      f"(gm, example_inputs) -> callable; got {show(inner)}")


def _validate_debug_dir(value: Any) -> str | None:
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise OptionError(f"option 'debug_dir' must be None or a folder path (a non-empty str or os.PathLike) "
                          f"to write graph dumps into; got {show(value)}")
    return path


def _check_names(options: Any) -> dict[str, Any]:
    """The options as a plain dict with string names, numpy scalars made Python numbers."""
    if not isinstance(options, Mapping):
        raise OptionError(f"options must be a dict of option names to values; got {show(options)}")
    names = list(options)
    bad = [k for k in names if not isinstance(k, str)]
    if bad:
        raise OptionError(f"option names must be strings; got {', '.join(show(k) for k in bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''} (valid options are "
                          f"{', '.join(map(repr, COMMON_OPTIONS))} and the policy's own, docs/policies.md)")
    return {str(k): native(options[k]) for k in names}


def parse_options(options: Mapping[str, Any] | None) -> Settings:
    """Turn the user's option mapping into :class:`Settings`, or raise :class:`OptionError`.

    Every check happens here, before anything is traced or compiled: option names are strings, values have
    the exact type asked for (numpy scalars count as numbers and bools, a bool never as a number), numbers
    are finite and in range, lists are lists of bounded length (maxima in docs/policies.md), a profile is
    a valid profile file."""
    options = _check_names(options if options is not None else {})
    policy_name = options.pop("policy", DEFAULT_POLICY)
    if not isinstance(policy_name, str) or policy_name not in POLICIES:
        raise OptionError(f"option 'policy' must be one of {', '.join(map(repr, POLICIES))}; got {show(policy_name)}")
    policy_cls = POLICIES[policy_name]
    inner = _validate_inner(options.pop("inner", "inductor"))
    num_steps = options.pop("num_steps", None)
    if num_steps is not None:
        try:
            num_steps = integer(num_steps, minimum=1, maximum=MAX_STEPS)
        except Invalid:
            raise OptionError(f"option 'num_steps' must be None or an integer in [1, {MAX_STEPS}] "
                              f"(steps per generation); got {show(num_steps)}") from None
    sync = options.pop("sync", "auto")
    process_group = options.pop("process_group", None)
    sync = validate_sync_options(sync, process_group)
    debug_dir = _validate_debug_dir(options.pop("debug_dir", None))
    decisions = options.pop("decisions", "host")
    if not isinstance(decisions, str) or decisions not in DECISIONS_CHOICES:
        raise OptionError(f"option 'decisions' must be one of {', '.join(map(repr, DECISIONS_CHOICES))}; "
                          f"got {show(decisions)}")
    branches = options.pop("branches", "together")
    if not isinstance(branches, str) or branches not in BRANCHES_CHOICES:
        raise OptionError(f"option 'branches' must be one of {', '.join(map(repr, BRANCHES_CHOICES))}; "
                          f"got {show(branches)}")

    fields = {f.name for f in dataclasses.fields(policy_cls.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = sorted(fields | set(COMMON_OPTIONS))
        raise OptionError(
            f"unknown option {', '.join(show(k) for k in unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
            f"for policy {policy_name!r}; valid options are {', '.join(map(repr, valid))}"
        )
    config = policy_cls.config_class(**options)
    config.validate()
    return Settings(policy=policy_cls(config), inner=inner, num_steps=num_steps, sync=sync,
                    process_group=process_group, debug_dir=debug_dir, decisions=decisions, branches=branches)
