"""Calibration profiles: what a calibrated policy needs, as plain JSON, checked field by field.

A profile is data only: loading one is ``json.load`` plus type checks, never an import or an ``eval``.
It names the policy it was made for, the options that policy reads from it, the number of sampling
steps it was calibrated at and a fingerprint of the model's architecture; the rest (fit quality, the
target, predicted and measured numbers) is a report kept with it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._logging import get_logger
from ..errors import OptionError

log = get_logger(__name__)

FORMAT = "cachepass-profile"
VERSION = 1
POLICIES = ("teacache", "magcache")


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
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: the module inside
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

def _fail(source: str, message: str) -> OptionError:
    return OptionError(f"calibration profile {source}: {message}; make a new one with cachepass.calibrate(...) "
                       "or `cachepass calibrate`")


def _number(source, name, value, *, minimum=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, f"field {name!r} must be a number, got {value!r}")
    if positive and not value > 0:
        raise _fail(source, f"field {name!r} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(source, f"field {name!r} must be >= {minimum}, got {value!r}")
    return float(value)


def _integer(source, name, value, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"field {name!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _fail(source, f"field {name!r} must be >= {minimum}, got {value!r}")
    return value


def _typed(source, name, value, kind, what):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(source, f"field {name!r} must be {what}, got {value!r}")
    return value


def _numbers(source, name, value, *, positive=False):
    if not isinstance(value, list) or not value:
        raise _fail(source, f"field {name!r} must be a non-empty list of numbers, got {value!r}")
    return [_number(source, f"{name}[{i}]", v, positive=positive) for i, v in enumerate(value)]


def _options(source: str, policy: str, options: Any, num_steps: int) -> dict:
    _typed(source, "options", options, dict, "an object")
    out = {}

    def need(key):
        if key not in options:
            raise _fail(source, f"field 'options.{key}' is missing (a {policy} profile needs it)")
        return options[key]

    out["threshold"] = _number(source, "options.threshold", need("threshold"), minimum=0.0)
    if policy == "magcache":  # optional: the replay's values, used unless the user sets them
        if "max_skip_steps" in options:
            out["max_skip_steps"] = _integer(source, "options.max_skip_steps", options["max_skip_steps"], minimum=0)
        if "retention_ratio" in options:
            out["retention_ratio"] = _number(source, "options.retention_ratio", options["retention_ratio"],
                                             minimum=0.0)
    if policy == "teacache":
        out["indicator"] = _typed(source, "options.indicator", need("indicator"), str, "a string")
        out["coefficients"] = _numbers(source, "options.coefficients", need("coefficients"))
        out["ret_steps"] = _typed(source, "options.ret_steps", need("ret_steps"), bool, "true or false")
    else:
        ratios = need("mag_ratios")
        if not isinstance(ratios, list) or not ratios:
            raise _fail(source, f"field 'options.mag_ratios' must be a list of per-stream lists, got {ratios!r}")
        out["mag_ratios"] = [_numbers(source, f"options.mag_ratios[{i}]", r, positive=True)
                             for i, r in enumerate(ratios)]
        bad = [len(r) for r in out["mag_ratios"] if len(r) != num_steps]
        if bad:
            raise _fail(source, f"field 'options.mag_ratios' has {bad[0]} ratios per stream for num_steps={num_steps}")
    unknown = sorted(set(options) - set(out))
    if unknown:
        raise _fail(source, f"unknown field(s) {', '.join('options.' + k for k in unknown)} for policy {policy!r}")
    return out


# --- the profile ---------------------------------------------------------------------------------

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
    _warned_steps: set = field(default_factory=set, repr=False, compare=False)

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
        _typed(source, "(top level)", data, dict, "a JSON object")
        if data.get("format") != FORMAT:
            raise _fail(source, f"field 'format' must be {FORMAT!r}, got {data.get('format')!r} (not a cachepass profile?)")
        version = _integer(source, "version", data.get("version"))
        if version != VERSION:
            raise _fail(source, f"version {version} is not supported (this cachepass reads version {VERSION})")
        for key in ("policy", "num_steps", "model", "options"):
            if key not in data:
                raise _fail(source, f"field {key!r} is missing")
        policy = data["policy"]
        if policy not in POLICIES:
            raise _fail(source, f"field 'policy' must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        num_steps = _integer(source, "num_steps", data["num_steps"], minimum=1)
        model = _typed(source, "model", data["model"], dict, "an object")
        for key in ("class", "parameters", "digest"):
            if key not in model:
                raise _fail(source, f"field 'model.{key}' is missing")
        fingerprint = ModelFingerprint(_typed(source, "model.class", model["class"], str, "a string"),
                                       _integer(source, "model.parameters", model["parameters"], minimum=0),
                                       _typed(source, "model.digest", model["digest"], str, "a string"))
        report = _typed(source, "report", data.get("report", {}), dict, "an object")
        return cls(policy, _options(source, policy, data["options"], num_steps), num_steps, fingerprint,
                   report, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise OptionError(f"calibration profile {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(str(path), f"not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))

    def check_model(self, model) -> bool:
        """Warn (once per call) when ``model`` is not the architecture this profile was calibrated on."""
        now = ModelFingerprint.of(model)
        if now == self.model:
            return True
        log.warning(
            "calibration profile %s was made for %s (%d parameters, fingerprint %s) but is applied to %s (%d "
            "parameters, fingerprint %s): its %s settings are unlikely to fit this model. Calibrate this model "
            "with cachepass.calibrate(...).", self.source, self.model.class_name, self.model.parameters,
            self.model.digest[:12], now.class_name, now.parameters, now.digest[:12], self.policy)
        return False

    def check_steps(self, num_steps: int | None) -> bool:
        """Warn when a generation has another step count than the one the profile was calibrated at."""
        if num_steps is None or num_steps == self.num_steps:
            return True
        if num_steps in self._warned_steps:
            return False
        self._warned_steps.add(num_steps)
        log.warning(
            "calibration profile %s was calibrated at %d steps but the model runs %d: the %s threshold no longer "
            "predicts the computed steps or the error. Calibrate again with this step count.",
            self.source, self.num_steps, num_steps, self.policy)
        return False

    def summary(self) -> str:
        """A few lines for people: policy, the options it sets, and the report's numbers."""
        lines = [f"cachepass profile [{self.policy}] for {self.model.class_name} ({self.model.parameters} "
                 f"parameters), {self.num_steps} steps"]
        for key, value in self.options.items():
            if key == "mag_ratios":
                value = f"{len(value)} stream(s) x {len(value[0])} steps"
            elif key == "coefficients":
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
    """The option ``profile``: a :class:`Profile`, a path to a profile file, or its parsed dict."""
    if isinstance(value, Profile):
        profile = value
    elif isinstance(value, (str, os.PathLike)):
        profile = Profile.load(value)
    elif isinstance(value, dict):
        profile = Profile.from_dict(value)
    else:
        raise OptionError(f"option 'profile' must be a path to a calibration profile (JSON) or a "
                          f"cachepass.calibration.Profile; got {value!r}")
    if policy is not None and profile.policy != policy:
        raise OptionError(f"option 'profile': {profile.source} is a {profile.policy!r} profile, not a {policy!r} one; "
                          f"use policy={profile.policy!r} or calibrate with policy={policy!r}")
    return profile
