"""The one place options are declared, defaulted and validated.

``torch.compile(m, backend="cachepass", options={...})`` and ``cachepass.backend(**options)`` both end
here, so the option names are the same on both routes. Validation happens before any analysis or
compilation; every error names the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .distributed import validate_sync_options
from .errors import OptionError
from .policies import POLICIES, Policy

DEFAULT_POLICY = "teacache"
INNER_CHOICES = ("inductor", "eager")

#: Options every policy accepts; everything else belongs to the chosen policy's config.
COMMON_OPTIONS = ("policy", "inner", "num_steps", "sync", "process_group")


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

    @property
    def policy_name(self) -> str:
        return self.policy.name


def _validate_inner(inner: Any) -> str | Callable:
    if callable(inner):
        return inner
    if not isinstance(inner, str):
        raise OptionError(f"option 'inner' must be 'inductor', 'eager', a backend name or a callable; got {inner!r}")
    if inner in INNER_CHOICES:
        return inner
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    if inner == "cachepass":
        raise OptionError("option 'inner' cannot be 'cachepass' itself")
    try:
        lookup_backend(inner)
    except Exception:
        names = sorted(set(INNER_CHOICES) | set(list_backends()) - {"cachepass"})
        raise OptionError(f"option 'inner' must be one of {', '.join(map(repr, names))} or a callable; got {inner!r}") from None
    return inner


def parse_options(options: Mapping[str, Any] | None) -> Settings:
    """Turn the user's option mapping into :class:`Settings`, or raise :class:`OptionError`."""
    options = dict(options or {})
    policy_name = options.pop("policy", DEFAULT_POLICY)
    if policy_name not in POLICIES:
        raise OptionError(f"option 'policy' must be one of {', '.join(map(repr, POLICIES))}; got {policy_name!r}")
    policy_cls = POLICIES[policy_name]
    inner = _validate_inner(options.pop("inner", "inductor"))
    num_steps = options.pop("num_steps", None)
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise OptionError(f"option 'num_steps' must be a positive integer or None; got {num_steps!r}")
    sync = options.pop("sync", "auto")
    process_group = options.pop("process_group", None)
    validate_sync_options(sync, process_group)

    fields = {f.name for f in dataclasses.fields(policy_cls.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = sorted(fields | set(COMMON_OPTIONS))
        raise OptionError(
            f"unknown option {', '.join(map(repr, unknown))} for policy {policy_name!r}; "
            f"valid options are {', '.join(map(repr, valid))}"
        )
    config = policy_cls.config_class(**options)
    config.validate()
    return Settings(policy=policy_cls(config), inner=inner, num_steps=num_steps, sync=sync,
                    process_group=process_group)
