"""Calibration profiles: what a calibrated policy needs, as plain JSON, checked field by field.

A profile is data only: loading one is ``json.load`` plus type checks, never an import or an ``eval``.
It names the policy it was made for, the options that policy reads from it, the number of sampling
steps it was calibrated at and a fingerprint of the model's architecture; the rest (fit quality, the
target, predicted and measured numbers) is a report kept with it.

Which policies have profiles, and what their ``options`` hold, is the policies' own business: a policy
class that declares a :class:`~cachepass.policies.base.Calibration` is calibratable, and its calibration's
``profile_options`` checks the profile's options (besides ``threshold``) through :class:`ProfileFields`.

The model fingerprint is the class name, the parameter count and a SHA-256 over the names, shapes and
dtypes of all parameters and buffers plus the model's ``config`` (diffusers models) - not over the
weights, which would take seconds on a large model. So it tells two architectures apart, not a model
from its fine-tune: recalibrate after changing weights (LoRA, fine-tuning) as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._dynamo import unwrap
from .._logging import get_logger, warn_once
from ..errors import OptionError
from ..policies.base import (
    MAX_STEPS,
    Invalid,
    boolean,
    finite_number,
    integer,
    is_sequence,
    number_list,
    show,
)

if TYPE_CHECKING:
    from ..policies.base import Policy

log = get_logger(__name__)

FORMAT = "cachepass-profile"
VERSION = 1


def calibratable_policies() -> dict[str, type["Policy"]]:
    """The registered policies that declare a calibration (``Policy.calibration``), by name: the ones
    ``cachepass.calibrate`` fits and whose name a profile's ``policy`` field may hold."""
    from ..policies import POLICIES

    return {name: cls for name, cls in POLICIES.items() if cls.calibration is not None}


# --- model fingerprint ---------------------------------------------------------------------------

def _config_of(model) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True, default=str))
    except (TypeError, ValueError):
        return str(config)


@dataclass(frozen=True)
class ModelFingerprint:
    class_name: str
    parameters: int
    digest: str  # sha256 of parameter/buffer names, shapes, dtypes and the model config

    @classmethod
    def of(cls, model) -> "ModelFingerprint":
        model = unwrap(model)  # a torch.compile wrapper: the module inside
        h = hashlib.sha256(type(model).__qualname__.encode())
        count = 0
        for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
            for name, t in items:
                h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
                count += t.numel() if kind == "p" else 0
        h.update(json.dumps(_config_of(model), sort_keys=True).encode())
        return cls(type(model).__qualname__, count, h.hexdigest()[:32])

    def to_dict(self) -> dict:
        return {"class": self.class_name, "parameters": self.parameters, "digest": self.digest}


# --- field checks --------------------------------------------------------------------------------

#: A profile file larger than this is not read (10_000 steps x 64 branches of ratios fit in it).
MAX_PROFILE_BYTES = 64 * 2**20


def _fail(source: str, message: str) -> OptionError:
    return OptionError(f"calibration profile {source} is not a valid cachepass profile: {message}; make a new one "
                       "with cachepass.calibrate(...) or `cachepass calibrate`")


def _field(source: str, name: str, exc: Invalid) -> OptionError:
    if exc.index is not None:
        name = f"{name}[{exc.index}]"
    return _fail(source, f"field {name!r} {exc.detail}")


def _number(source, name, value, *, minimum=None, maximum=None, positive=False):
    try:
        return finite_number(value, minimum=0.0 if positive else minimum, maximum=maximum, strict=positive)
    except Invalid as exc:
        raise _field(source, name, exc) from None


def _integer(source, name, value, *, minimum=None, maximum=None):
    try:
        return integer(value, minimum=minimum, maximum=maximum)
    except Invalid as exc:
        raise _field(source, name, exc) from None


def _typed(source, name, value, kind, what):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(source, f"field {name!r} must be {what}, got {show(value)}")
    return value


def _object(source, name, value) -> dict:
    """A JSON object: a dict whose keys are all strings."""
    if not isinstance(value, dict):
        raise _fail(source, f"field {name!r} must be an object, got {show(value)}" if name != "(top level)" else
                    f"the top level must be a JSON object, got {show(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _fail(source, f"field {name!r} has a key that is not a string: {show(bad[0])}")
    return value


def _numbers(source, name, value, *, positive=False, max_length=MAX_STEPS):
    if not is_sequence(value):
        raise _fail(source, f"field {name!r} must be a non-empty list of numbers, got {show(value)}")
    try:
        return number_list(value, max_length=max_length, positive=positive)
    except Invalid as exc:
        if exc.index is not None:  # name the item: "field 'options.coefficients[1]' must be a finite number"
            return [_number(source, f"{name}[{i}]", v, positive=positive) for i, v in enumerate(list(value))]
        raise _field(source, name, exc) from None


_FIELD = object()


class ProfileFields:
    """The ``options`` object of one profile, for a policy's ``Calibration.profile_options`` to read field by
    field. Each getter returns the checked value of ``options[key]`` (or of ``value=`` when given, an item
    of a field: ``numbers("mag_ratios[0]", value=row)``) or raises an :class:`OptionError` naming the file
    and the field (``'options.KEY'``). ``num_steps`` is the profile's step count."""

    def __init__(self, source: str, policy: str, options: dict, num_steps: int) -> None:
        self.source, self.policy, self.options, self.num_steps = source, policy, options, num_steps

    def has(self, key: str) -> bool:
        return key in self.options

    def need(self, key: str) -> Any:
        """The raw value; a missing field is an error."""
        if key not in self.options:
            raise self.fail(f"field 'options.{key}' is missing (a {self.policy} profile needs it)")
        return self.options[key]

    def _get(self, key: str, value: Any) -> Any:
        return self.need(key) if value is _FIELD else value

    def number(self, key: str, *, value: Any = _FIELD, minimum=None, maximum=None, positive=False) -> float:
        return _number(self.source, f"options.{key}", self._get(key, value), minimum=minimum, maximum=maximum,
                       positive=positive)

    def integer(self, key: str, *, value: Any = _FIELD, minimum=None, maximum=None) -> int:
        return _integer(self.source, f"options.{key}", self._get(key, value), minimum=minimum, maximum=maximum)

    def numbers(self, key: str, *, value: Any = _FIELD, positive=False, max_length=MAX_STEPS) -> list[float]:
        return _numbers(self.source, f"options.{key}", self._get(key, value), positive=positive,
                        max_length=max_length)

    def choice(self, key: str, choices: tuple[str, ...], *, value: Any = _FIELD) -> str:
        """A string, one of ``choices``."""
        text = _typed(self.source, f"options.{key}", self._get(key, value), str, "a string")
        if text not in choices:
            raise self.fail(f"field 'options.{key}' must be one of {', '.join(map(repr, choices))}, got {show(text)}")
        return text

    def boolean(self, key: str, *, value: Any = _FIELD) -> bool:
        raw = self._get(key, value)
        try:
            return boolean(raw)
        except Invalid:
            raise self.fail(f"field 'options.{key}' must be true or false, got {show(raw)}") from None

    def fail(self, message: str) -> OptionError:
        """The error for ``message`` (``"field 'options.KEY' ..."``), naming the file; raise it."""
        return _fail(self.source, message)


def _options(source: str, policy: str, options: Any, num_steps: int) -> dict:
    """The profile's options: ``threshold`` (every calibration searches one), then the policy's own."""
    _object(source, "options", options)
    fields = ProfileFields(source, policy, options, num_steps)
    out = {"threshold": fields.number("threshold", minimum=0.0)}
    out.update(calibratable_policies()[policy].calibration.profile_options(fields))
    unknown = sorted(set(options) - set(out))
    if unknown:
        raise _fail(source, f"unknown field(s) {', '.join(show('options.' + k) for k in unknown[:5])} "
                            f"for policy {policy!r}")
    return out


# --- the profile ---------------------------------------------------------------------------------

#: Report keys renamed since version 1 was first written: (section, old key, new key). A profile is read
#: with either; the new key is what is written and what a loaded profile holds.
_RENAMED_REPORT_KEYS = (("recording", "streams", "branches"),)


def _upgrade_report(report: dict) -> dict:
    """``report`` with the old keys of :data:`_RENAMED_REPORT_KEYS` under their new names (a copy when
    one is renamed; a key present under both names keeps the new one)."""
    for section, old, new in _RENAMED_REPORT_KEYS:
        entries = report.get(section)
        if isinstance(entries, dict) and old in entries:
            renamed = {new if k == old else k: v for k, v in entries.items() if not (k == old and new in entries)}
            report = {**report, section: renamed}
    return report


@dataclass
class Profile:
    """A calibrated policy for one model and step count. ``options`` are the policy's; ``report`` holds the
    fit quality, the target and the predicted / measured computed steps and error (informational)."""

    policy: str
    options: dict
    num_steps: int
    model: ModelFingerprint
    report: dict = field(default_factory=dict)
    source: str = "<memory>"

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "policy": self.policy, "num_steps": self.num_steps,
                "model": self.model.to_dict(), "options": self.options, "report": self.report}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.source = str(path)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Profile":
        """The profile in ``data`` (a parsed JSON object), every field checked; :class:`OptionError` naming
        ``source`` and the field otherwise."""
        _object(source, "(top level)", data)
        if data.get("format") != FORMAT:
            raise _fail(source, f"field 'format' must be {FORMAT!r}, got {show(data.get('format'))} "
                                "(not a cachepass profile?)")
        version = _integer(source, "version", data.get("version"))
        if version != VERSION:
            raise _fail(source, f"version {version} is not supported (this cachepass reads version {VERSION})")
        for key in ("policy", "num_steps", "model", "options"):
            if key not in data:
                raise _fail(source, f"field {key!r} is missing")
        policy, policies = data["policy"], calibratable_policies()
        if not isinstance(policy, str) or policy not in policies:
            raise _fail(source, f"field 'policy' must be one of {', '.join(map(repr, policies))}, got {show(policy)}")
        num_steps = _integer(source, "num_steps", data["num_steps"], minimum=1, maximum=MAX_STEPS)
        model = _object(source, "model", data["model"])
        for key in ("class", "parameters", "digest"):
            if key not in model:
                raise _fail(source, f"field 'model.{key}' is missing")
        fingerprint = ModelFingerprint(_typed(source, "model.class", model["class"], str, "a string"),
                                       _integer(source, "model.parameters", model["parameters"], minimum=0),
                                       _typed(source, "model.digest", model["digest"], str, "a string"))
        report = _upgrade_report(_object(source, "report", data.get("report", {})))
        return cls(policy, _options(source, policy, data["options"], num_steps), num_steps, fingerprint,
                   report, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile file: JSON text (UTF-8), at most ``MAX_PROFILE_BYTES``, checked by :meth:`from_dict`.
        Data only: nothing in it is imported or evaluated."""
        path = Path(path)
        try:
            info = path.stat()
        except OSError as exc:
            raise OptionError(f"option 'profile': calibration profile {path}: cannot read it ({exc.strerror or exc})") from None
        except ValueError as exc:  # a NUL byte in the path
            raise OptionError(f"option 'profile': cannot read calibration profile {show(str(path))} ({exc})") from None
        if not stat.S_ISREG(info.st_mode):
            raise OptionError(f"option 'profile': calibration profile {path}: cannot read it (not a regular file)")
        if info.st_size > MAX_PROFILE_BYTES:
            raise _fail(str(path), f"the file has {info.st_size} bytes, more than {MAX_PROFILE_BYTES}")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PROFILE_BYTES + 1)
        except OSError as exc:
            raise OptionError(f"option 'profile': calibration profile {path}: cannot read it ({exc.strerror or exc})") from None
        if len(raw) > MAX_PROFILE_BYTES:
            raise _fail(str(path), f"the file has more than {MAX_PROFILE_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise _fail(str(path), f"not UTF-8 text (a binary file? byte {exc.start} is {raw[exc.start]:#04x})") \
                from None
        try:
            data = json.loads(text)
        except RecursionError:
            raise _fail(str(path), "not valid JSON for a profile (nested too deeply)") from None
        except ValueError as exc:  # json.JSONDecodeError, or an integer of more than 4300 digits
            raise _fail(str(path), f"not valid JSON ({str(exc)[:200]})") from None
        return cls.from_dict(data, str(path))

    def check_model(self, model) -> bool:
        """Warn when ``model`` is not the architecture this profile was calibrated on: once per profile and
        model architecture (in this process), at DEBUG after."""
        now = ModelFingerprint.of(model)
        if now == self.model:
            return True
        warn_once(
            log, ("profile-model", self.source, self.model.digest, now.digest),
            "calibration profile %s was made for %s (%d parameters, fingerprint %s) but is applied to %s (%d "
            "parameters, fingerprint %s): its %s settings are unlikely to fit this model. Calibrate this model "
            "with cachepass.calibrate(...).", self.source, self.model.class_name, self.model.parameters,
            self.model.digest[:12], now.class_name, now.parameters, now.digest[:12], self.policy)
        return False

    def check_steps(self, num_steps: int | None) -> bool:
        """Warn when a generation has another step count than the one the profile was calibrated at: once
        per profile and step count (in this process, whatever the branches, graphs or loads), at DEBUG after."""
        if num_steps is None or num_steps == self.num_steps:
            return True
        warn_once(
            log, ("profile-steps", self.source, self.model.digest, self.num_steps, num_steps),
            "calibration profile %s was calibrated at %d steps but the model runs %d: the %s threshold no longer "
            "predicts the computed steps or the error. Calibrate again with this step count.",
            self.source, self.num_steps, num_steps, self.policy)
        return False

    def summary(self) -> str:
        """A few lines for people: policy, the options it sets, and the report's numbers."""
        lines = [f"cachepass profile [{self.policy}] for {self.model.class_name} ({self.model.parameters} "
                 f"parameters), {self.num_steps} steps"]
        for key, value in self.options.items():
            if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
                value = f"{len(value)} branch(es) x {len(value[0])} steps"  # a table per branch and step
            elif isinstance(value, list) and all(isinstance(v, float) for v in value):
                value = "[" + ", ".join(f"{c:.6g}" for c in value) + "]"
            lines.append(f"  {key}: {value}")
        for key, value in self.report.items():
            lines.append(f"  {key}: {json.dumps(value)}")
        return "\n".join(lines)


def fill_options(config, policy: str, defaults: dict[str, Any]):
    """``config`` (a policy config with a ``profile`` field) with the options left ``None`` taken from its
    profile, else from ``defaults``; the profile loaded (or ``None``). Options given explicitly win."""
    profile = load_profile(config.profile, policy) if config.profile is not None else None
    taken = profile.options if profile is not None else {}
    values = {key: getattr(config, key) if getattr(config, key) is not None else taken.get(key, default)
              for key, default in defaults.items()}
    return dataclasses.replace(config, profile=profile, **values), profile


def load_profile(value: Any, policy: str | None = None) -> Profile:
    """The option ``profile``: a :class:`Profile` (checked again, field by field), a path to a profile file,
    or its parsed dict."""
    if isinstance(value, Profile):
        if not isinstance(value.model, ModelFingerprint):
            raise _fail(value.source, f"field 'model' must be a ModelFingerprint, got {show(value.model)}")
        profile = Profile.from_dict(value.to_dict(), value.source)
    elif isinstance(value, (str, os.PathLike)) and str(value):
        profile = Profile.load(value)
    elif isinstance(value, dict):
        profile = Profile.from_dict(value, "(the dict given as option 'profile')")
    else:
        raise OptionError(f"option 'profile' must be a path to a calibration profile (JSON) or a "
                          f"cachepass.calibration.Profile; got {show(value)}")
    if policy is not None and profile.policy != policy:
        raise OptionError(f"option 'profile': {profile.source} is a {profile.policy!r} profile, not a {policy!r} one; "
                          f"use policy={profile.policy!r} or calibrate with policy={policy!r}")
    return profile
