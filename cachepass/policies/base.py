"""The policy interface: what a policy declares at compile time and decides at run time.

A policy is split in two so that the compiler pass never needs to know the algorithm:

* at compile time it states its :class:`Requirements`: which indicator tensor the head graph must
  produce before the decision (none, or one of :data:`INDICATORS` by name: the timestep embedding, the
  first block's modulated input, the first block's output, the front blocks' residual), which body
  tensors a computed call hands back (feature names, :mod:`cachepass.analysis.features`) and how a
  skipped call is rebuilt (a :class:`~cachepass.reconstruction.Reconstruction`);
* at run time, per call, :meth:`Policy.decide` sees a :class:`CallContext` (generation, step, branch,
  number of steps when known) and the indicator tensor, and returns ``True`` to compute the block stack
  or ``False`` to reuse the cache; after a computed call :meth:`Policy.after_compute` gets the observed
  tensors by name. A policy keeps all its mutable data in the state object it created with
  :meth:`Policy.new_state`; the runtime keeps one such state per branch and makes a new one at every
  generation, so policies never reset themselves.

A policy class also declares its :attr:`Policy.examples` (the option sets the tests run it with) and, when
``cachepass.calibrate`` can fit it, a :class:`Calibration` (:attr:`Policy.calibration`). Adding a policy
is its module plus one line in ``cachepass.policies.POLICIES`` (docs/policies.md, "Adding a policy").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .._deprecation import renamed_attribute, renamed_keywords, renamed_module_attributes
from ..analysis import indicators as _indicators
from ..analysis.features import check_feature_name, indicator_name
from ..errors import OptionError
from ..reconstruction import Reconstruction, ResidualReuse
from ..runtime.distributed import LOCAL, DecisionSync

#: Indicators a policy may decide on, by name: the one list, :data:`cachepass.analysis.indicators.INDICATORS`.
#: ``front_residual``: the residual of the ``compute_first`` front blocks (output minus input), made by
#: the head graph (First-Block-Cache, DBCache).
INDICATORS = tuple(_indicators.INDICATORS)


@dataclass(frozen=True)
class Requirements:
    """What the compiled program must provide to a policy.

    * ``indicator``: computed by the head graph before every decision: one of ``INDICATORS``, named as
      such (``"timestep_embedding"``) or by its feature name (``"indicator:timestep_embedding"``); kept as
      the bare name.
    * ``compute_first`` / ``compute_last``: blocks computed on every call before / after the cached
      span (First-Block-Cache: 1/0; DBCache: Fn/Bn). The residual cached is the span's.
    * ``observe``: body tensors the compute variant also returns, handed to ``after_compute`` as a dict
      by these names (feature names from ``cachepass.analysis.features``, e.g. ``attention_output:middle``).
    * ``reconstruction``: how a reuse call rebuilds the span's outputs.

    A name that is not an indicator or a feature is a ``ValueError`` here, when the policy states it.
    """

    indicator: str | None = None
    reconstruction: Reconstruction = dataclasses.field(default_factory=ResidualReuse)
    compute_first: int = 0
    compute_last: int = 0
    observe: tuple[str, ...] = ()
    reuses: bool = True  # False (policy ``none``): no cache writes, no reuse variant compiled
    #: The last names of ``observe`` that a model may lack (adacache's ``frame_grid`` on an image model):
    #: one that does not resolve is left out, and ``after_compute`` gets no entry for it.
    optional: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.indicator is not None:
            object.__setattr__(self, "indicator", indicator_name(self.indicator))
        observe = tuple(check_feature_name(name) for name in self.observe)
        if len(set(observe)) != len(observe):
            raise ValueError(f"Requirements.observe names a feature twice: {observe}")
        object.__setattr__(self, "observe", observe)
        optional = tuple(check_feature_name(name) for name in self.optional)
        if optional and observe[len(observe) - len(optional):] != optional:
            raise ValueError(f"Requirements.optional {optional} must be the last names of observe {observe}")
        object.__setattr__(self, "optional", optional)


@renamed_keywords({"stream": "branch_index"})
@dataclass(frozen=True)
class CallContext:
    """Where one denoiser call sits in the sampling loop (:mod:`cachepass.runtime.placement`).

    ``generation`` is the request (per module instance), ``branch_index`` the branch's rank in it (cond,
    uncond: in order of first appearance) and ``branch`` its name when the pipeline gave one (``"cond"``);
    ``num_steps`` is known from the first request on or never (the ``num_steps`` option, or the pipeline's
    step count). ``stream`` (deprecated) is ``branch_index``.

    ``sync`` sums a decision's statistics over the ranks that must decide together (sequence
    parallelism; identity on one process): a policy stacks every sum one decision reads into one tensor
    and calls ``ctx.sync.reduce`` once (see :mod:`cachepass.runtime.distributed`).
    """

    generation: int
    step: int
    branch_index: int
    num_steps: int | None
    timestep: float | None
    sync: DecisionSync = LOCAL
    branch: Any = None

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1

    stream = renamed_attribute("branch_index", "CallContext.stream", "CallContext.branch_index")


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy's options. Subclasses add fields and check them in ``validate``."""

    def validate(self) -> None:  # pragma: no cover - trivial default
        """Raise :class:`OptionError` naming the option and what is allowed."""


#: Names of the example option sets the tests read from :attr:`Policy.examples`:
#: ``tiny`` (required): runs and reuses the cache on the tests' tiny models (a tiny diffusers Wan with 4
#: blocks, 20 steps with CFG; a plain DiT of 4 blocks, 10 steps; ``num_steps`` known) and stays close to
#: the uncached output; ``tiny:VARIANT``: more cases of the same kind (each one an end-to-end test);
#: ``image``: options merged over those on a model without frames (a plain DiT: no video latent);
#: ``sequence_parallel``: the sequence-parallel test model (``tests/sp_model.py``: 14 steps, 32 tokens,
#: random weights), where it must reuse at least once (default: the ``tiny`` set).
EXAMPLE_TINY, EXAMPLE_IMAGE, EXAMPLE_SEQUENCE_PARALLEL = "tiny", "image", "sequence_parallel"


class Policy(ABC):
    """A cache-reuse algorithm, independent of any model.

    Besides ``name`` and ``config_class`` a policy class declares:

    * ``examples``: named option sets that exercise it (see ``EXAMPLE_TINY`` and the other names above);
      the tests run every registered policy with them, so a new policy is tested by its registry line;
    * ``calibration``: a :class:`Calibration` when ``cachepass.calibrate`` can fit the policy to a model
      (its profiles then name the policy); ``None`` otherwise.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PolicyConfig]]
    examples: ClassVar[dict[str, dict[str, Any]]] = {}
    calibration: ClassVar["Calibration | None"] = None
    #: Whether ``decide`` / ``after_compute`` read ``ctx.timestep``. When not, and the pipeline states the
    #: step (``cache_context`` with a step index), the timestep is never read back from the device.
    reads_timestep: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @classmethod
    def example(cls, name: str = EXAMPLE_TINY) -> dict[str, Any]:
        """The example option set ``name`` (a copy); ``sequence_parallel`` falls back to ``tiny``, ``image``
        to no options. ``KeyError`` for a set the policy lacks."""
        if name not in cls.examples:
            if name == EXAMPLE_IMAGE:
                return {}
            if name == EXAMPLE_SEQUENCE_PARALLEL:
                name = EXAMPLE_TINY
        return copy.deepcopy(cls.examples[name])

    @classmethod
    def tiny_examples(cls) -> dict[str, dict[str, Any]]:
        """``tiny`` and every ``tiny:VARIANT`` set, by case name (``tiny`` first)."""
        names = sorted((n for n in cls.examples if n == EXAMPLE_TINY or n.startswith(EXAMPLE_TINY + ":")),
                       key=lambda n: n != EXAMPLE_TINY)
        return {n: cls.example(n) for n in names}

    @abstractmethod
    def requirements(self) -> Requirements:
        """Declared once, at compile time."""

    def new_state(self) -> Any:
        """Fresh per-branch state for a new generation."""
        return None

    @abstractmethod
    def decide(self, state: Any, ctx: CallContext, indicator: torch.Tensor | None) -> bool:
        """``True``: compute the blocks this call; ``False``: rebuild them from the cache."""

    def after_compute(self, state: Any, ctx: CallContext, observed: dict[str, torch.Tensor]) -> None:
        """Called after each compute call with the tensors named in ``Requirements.observe``, by those names
        (``observed["attention_output:middle"]``)."""

    def check_model(self, model: torch.nn.Module) -> None:
        """Called at compile time with the user's module when it is known (a calibrated policy warns when
        its profile was made for another model)."""

    def sequence_parallel_exact(self) -> bool:
        """Whether summing this policy's statistics over sequence-parallel ranks gives exactly the
        decisions of one process on the whole sequence (sums of per-token terms do; a term pairing tokens
        that may sit on two ranks does not: docs/distributed.md)."""
        return True

    def observed_by_name(self, values) -> dict[str, torch.Tensor]:
        """The compute variant's observed outputs (in ``Requirements.observe`` order) keyed by their names:
        what :meth:`after_compute` receives."""
        names = self.__dict__.get("_observe_names")
        if names is None:
            names = self.__dict__["_observe_names"] = self.requirements().observe
        values = tuple(values)
        optional = self.requirements().optional if len(values) < len(names) else ()
        if len(names) - len(optional) <= len(values) < len(names):  # optional features the model lacks
            names = names[:len(values)]
        if len(values) != len(names):
            raise RuntimeError(f"policy {self.name!r}: the compute variant returned {len(values)} observed "
                               f"tensors for the {len(names)} named in Requirements.observe {names}")
        return dict(zip(names, values))


# --- calibration: how a policy is fitted to a model and read back from a profile ----------------

@dataclass
class CalibrationFit:
    """What :meth:`Calibration.fit` returns: the policy replayed per threshold on the recording (a
    :class:`~cachepass.calibration.ThresholdSearch`), the options the profile stores besides the
    threshold, and the fit's quality for the profile's report (``report["fit"]``)."""

    search: Any
    fixed: dict[str, Any]
    report: dict[str, Any]


class Calibration:
    """A policy's calibration, declared on the policy class: ``calibration = MyCalibration()``.

    ``cachepass.calibrate`` is generic over the policies that declare one: it records full generations,
    asks :meth:`fit` for the fitted options and a threshold search, picks the ``threshold`` for the user's
    compute or error target, and writes a :class:`~cachepass.calibration.Profile` naming the policy. Reading
    a profile back checks ``threshold`` and asks :meth:`profile_options` for the rest, field by field; the
    policy's config fills its options from the profile (``cachepass.calibration.profile.fill_options``).
    The policy's config must take ``threshold`` (the value searched), every key of ``fixed`` and a
    ``profile`` option (the check generation runs the policy with the new profile).
    """

    #: Keyword options ``cachepass.calibrate(..., **options)`` accepts for this policy.
    options: ClassVar[tuple[str, ...]] = ()
    #: The policy class this calibration belongs to (set when the class body assigns it).
    policy: type["Policy"]

    def __set_name__(self, owner: type, name: str) -> None:
        self.policy = owner

    def fit(self, recording, *, indicator: str, degree: int, options: dict[str, Any],
            budget: int | None) -> CalibrationFit:
        """Fit the policy to ``recording``. ``indicator`` and ``degree`` are ``calibrate``'s (a policy that
        decides on no indicator ignores them), ``options`` the policy's own from :attr:`options`,
        ``budget`` the computed steps per branch the target allows (``None`` for an error target)."""
        raise NotImplementedError

    def search(self, recording, fixed: dict[str, Any], indicator: str | None):
        """A :class:`~cachepass.calibration.ThresholdSearch` replaying the policy with ``fixed`` and each
        threshold on ``recording`` (``indicator``: the recorded indicator fed to ``decide``, or ``None``)."""
        from ..calibration.threshold import ThresholdSearch

        cls = self.policy
        return ThresholdSearch(lambda threshold: cls(cls.config_class(threshold=threshold, **fixed)), recording,
                               indicator)

    def profile_options(self, fields) -> dict[str, Any]:
        """The options of a profile besides ``threshold``, each checked through ``fields`` (a
        :class:`~cachepass.calibration.profile.ProfileFields`, whose errors name the file and the field)."""
        return {}


# --- option checking: the one set of checks every option and profile field goes through --------

#: Documented maxima (docs/policies.md). Steps per generation, and so every step count or interval option.
MAX_STEPS = 10_000
#: Branches (cond, uncond, ...) a magcache ratio table may hold.
MAX_BRANCHES = 64
#: Coefficients of a TeaCache polynomial (degree 31 at most).
MAX_COEFFICIENTS = 32
#: Entries of an AdaCache codebook.
MAX_CODEBOOK = 64
#: Blocks a ``Fn`` / ``Bn`` option may name.
MAX_BLOCKS = 10_000
#: Tokens per frame (``tokens_per_frame``).
MAX_TOKENS = 2**31 - 1

_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxset = 3, 6, 6, 4, 4
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 40, 40, 24


def show(value: Any) -> str:
    """A short ``repr`` for messages: bounded in length and depth, safe on any object."""
    try:
        return _SHOW.repr(value)
    except Exception:  # a broken __repr__ (reprlib already guards most)
        return f"<{type(value).__name__} object>"


class Invalid(Exception):
    """Why a value is invalid (``must be ..., got ...``); the caller adds the option or field name.
    ``index``: the list item at fault, for a list."""

    def __init__(self, detail: str, index: Any = None, problem: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.index = detail, index
        self.problem = problem if problem is not None else detail  # the detail without "must be ..."


def is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_integer(value: Any) -> bool:
    """An ``int`` or a numpy integer; never a bool."""
    return isinstance(value, (int, np.integer)) and not is_bool(value)


def is_real(value: Any) -> bool:
    """An ``int``, ``float`` or numpy integer / floating scalar; never a bool (nor a complex, a string, a
    tensor or a ``Decimal``)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not is_bool(value)


def _num(x) -> str:
    return format(x, "g") if isinstance(x, float) else str(x)


def _range(minimum, maximum, strict) -> str:
    minimum, maximum = (None if x is None else _num(x) for x in (minimum, maximum))
    if minimum is not None and maximum is not None:
        return f" in {'(' if strict else '['}{minimum}, {maximum}]"
    if minimum is not None:
        return f" {'>' if strict else '>='} {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def finite_number(value: Any, *, minimum: float | None = None, maximum: float | None = None,
                  strict: bool = False) -> float:
    """``value`` as a finite ``float`` in range (``strict``: above ``minimum``), else :class:`Invalid`."""
    want = f"a finite number{_range(minimum, maximum, strict)}"
    if not is_real(value):
        raise Invalid(f"must be {want}, got {show(value)}")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        number = math.inf
    if not math.isfinite(number):
        raise Invalid(f"must be {want}, got {show(value)}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise Invalid(f"must be{_range(minimum, None, strict)}, got {show(value)}")
    if maximum is not None and number > maximum:
        raise Invalid(f"must be{_range(None, maximum, False)}, got {show(value)}")
    return number


def integer(value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in range, else :class:`Invalid` (a float, even 2.0, is not an integer)."""
    want = f"an integer{_range(minimum, maximum, False)}"
    if not is_integer(value):
        raise Invalid(f"must be {want}, got {show(value)}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise Invalid(f"must be{_range(minimum, None, False)}, got {show(value)}")
    if maximum is not None and number > maximum:
        raise Invalid(f"must be{_range(None, maximum, False)}, got {show(value)}")
    return number


def boolean(value: Any) -> bool:
    if not is_bool(value):
        raise Invalid(f"must be True or False, got {show(value)}")
    return bool(value)


def is_sequence(value: Any) -> bool:
    """A real list or tuple (a 1-d numpy array counts): not a string, a dict, a set or a scalar."""
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def number_list(value: Any, *, max_length: int, positive: bool = False, what: str = "numbers") -> list[float]:
    """``value`` as a list of 1 to ``max_length`` finite numbers (``positive``: each > 0), else
    :class:`Invalid` (``index`` set when one item is at fault)."""
    want = f"a list of 1 to {max_length} finite{' positive' if positive else ''} {what}"
    if not is_sequence(value):
        raise Invalid(f"must be {want}, got {show(value)}", problem=f"got {show(value)}")
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if not 1 <= len(items) <= max_length:
        raise Invalid(f"must be {want}, got {len(items)} items", problem=f"got {len(items)} items")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(finite_number(item, minimum=0.0 if positive else None, strict=positive))
        except Invalid as exc:
            raise Invalid(f"must be {want}; item {i} {exc.detail}", index=i, problem=f"item {i} {exc.detail}") \
                from None
    return out


def native(value: Any, depth: int = 0) -> Any:
    """``value`` with numpy scalars made Python ``bool`` / ``int`` / ``float`` and numeric numpy arrays made
    lists, inside lists, tuples and dicts too (to a small depth: deeper values are left for the checks to
    reject). Everything else is returned as it is."""
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            try:
                return float(value)
            except OverflowError:
                return math.inf
        return value
    if depth >= 8:
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf" and value.ndim <= 2 and value.size <= MAX_STEPS * MAX_BRANCHES:
            return native(value.tolist(), depth + 1)
        return value
    if type(value) in (list, tuple):
        return type(value)(native(v, depth + 1) for v in value)
    if type(value) is dict:
        return {native(k, depth + 1): native(v, depth + 1) for k, v in value.items()}
    return value


def _option(name: str, exc: Invalid) -> OptionError:
    return OptionError(f"option {name!r} {exc.detail}")


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        return integer(value, minimum=minimum, maximum=maximum)
    except Invalid as exc:
        raise _option(name, exc) from None


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                strict: bool = False) -> float:
    try:
        return finite_number(value, minimum=minimum, maximum=maximum, strict=strict)
    except Invalid as exc:
        raise _option(name, exc) from None


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if all(isinstance(c, str) for c in choices):
        ok = isinstance(value, str) and value in choices
    else:
        ok = any(value is c or (type(value) is type(c) and value == c) for c in choices)
    if not ok:
        raise OptionError(f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {show(value)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    try:
        return boolean(value)
    except Invalid as exc:
        raise _option(name, exc) from None


def check_optional_int(name: str, value: Any, *, minimum: int | None = None,
                       maximum: int | None = None) -> int | None:
    if value is None:
        return None
    return check_int(name, value, minimum=minimum, maximum=maximum)


def check_numbers(name: str, value: Any, *, max_length: int, positive: bool = False) -> list[float]:
    try:
        return number_list(value, max_length=max_length, positive=positive)
    except Invalid as exc:
        raise _option(name, exc) from None


# --- schedule helpers --------------------------------------------------------------------------

def is_forced_step(ctx: CallContext, first: int, last: int = 0) -> bool:
    """Whether the call is one of the first ``first`` steps or, when ``ctx.num_steps`` is known, one of
    the last ``last`` steps. With the step count unknown (first generation without the ``num_steps``
    option) no last step can be recognised, so only the first steps are forced."""
    if ctx.step < first:
        return True
    return last > 0 and ctx.num_steps is not None and ctx.step >= ctx.num_steps - last


#: ``MAX_STREAMS`` (deprecated): :data:`MAX_BRANCHES`
__getattr__ = renamed_module_attributes(__name__, {"MAX_STREAMS": "MAX_BRANCHES"})
