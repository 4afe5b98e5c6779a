"""The rows of the comparison: how each method is applied to a pipeline, asked for its stats, and removed.

A method is written ``TOOL-ALGO[+compile][:key=value,...]``; a value ``a|b|c`` sweeps (one row each):

* ``eager``, ``compile``: full compute, plain or under ``torch.compile`` (``--backend``, inductor);
* ``cachepass:POLICY[:options]``: ``torch.compile(model, backend="cachepass", options=...)``, inner
  compiler ``--backend``; always compiled; ``target_speedup`` / ``target_steps`` / ``max_error`` first run
  ``cachepass.calibrate`` on the workload (one full generation) and compile with the profile;
* ``diffusers-fbcache``, ``diffusers-taylorseer``, ``diffusers-magcache``: diffusers' own hooks,
  ``transformer.enable_cache(FirstBlockCacheConfig / TaylorSeerCacheConfig / MagCacheConfig)``;
* ``cache-dit-dbcache``, ``cache-dit-dbcache-taylorseer``: ``cache_dit.enable_cache(pipe, DBCacheConfig,
  [TaylorSeerCalibratorConfig])``.

``+compile`` applies ``torch.compile`` to the transformer after the hooks, as those tools document it
(cache-dit first calls its ``set_compile_configs()``, which this module undoes after the row).
Group names expand to sweeps: ``full``, ``cachepass``, ``diffusers``, ``cache-dit``, ``all``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import itertools
import re
from dataclasses import dataclass, field

import torch

import cachepass

GROUPS: dict[str, list[str]] = {
    "full": ["eager", "compile"],
    "cachepass": [
        "cachepass:none",
        "cachepass:interval:interval=2|3|5",
        "cachepass:teacache:threshold=0.1|0.2|0.4",
        "cachepass:taylorseer:interval=2|3|4|5|6|8|10|12",
        "cachepass:taylorseer:granularity=block,interval=2|4|6",
        "cachepass:adacache",
        "cachepass:customcache:threshold=0.1|0.26|0.4",
        "cachepass:fbcache:threshold=0.05|0.1|0.2",
        "cachepass:dbcache:threshold=0.08|0.15|0.3",
        "cachepass:dbcache:taylor=1,threshold=0.08|0.15|0.3",
        "cachepass:teacache:target_speedup=2|3",
        "cachepass:magcache:target_speedup=2|3",
        "cachepass:foca:interval=3|5|7|10",
        "cachepass:speca:threshold=0.1|0.2|0.4",
    ],
    "diffusers": [
        "diffusers-fbcache:threshold=0.05|0.1|0.2|0.3|0.5",
        "diffusers-fbcache+compile:threshold=0.1",
        "diffusers-taylorseer:use_lite_mode=True,cache_interval=3|5|7|10",
        "diffusers-taylorseer+compile:use_lite_mode=True,cache_interval=5",
        "diffusers-magcache:threshold=0.06|0.12|0.24|0.5|1.0",
        "diffusers-magcache+compile:threshold=0.12",
    ],
    "cache-dit": [
        "cache-dit-dbcache:threshold=0.08|0.15|0.3|0.5",
        "cache-dit-dbcache+compile:threshold=0.15",
        "cache-dit-dbcache-taylorseer:threshold=0.08|0.15|0.3|0.5|0.8",
        "cache-dit-dbcache-taylorseer+compile:threshold=0.15",
    ],
}
#: the sweeps reach down to ~12 % of the block work on both embedded models, so the budget table has rows
#: of every tool from 15 % up (the budgets of issue 15)
GROUPS["all"] = [m for g in ("full", "cachepass", "diffusers", "cache-dit") for m in GROUPS[g]]

#: Options of a ``cachepass:`` row that calibrate the policy on the workload first (``cachepass.calibrate``).
CALIBRATION_TARGETS = ("target_speedup", "target_steps", "max_error")

DIFFUSERS_ALGOS = {"fbcache": "FirstBlockCache", "taylorseer": "TaylorSeerCache", "magcache": "MagCache"}
CACHE_DIT_ALGOS = {"dbcache": "DBCache", "dbcache-taylorseer": "DBCache+TaylorSeer"}
#: Short option names for cache-dit's DBCacheConfig, so labels stay readable.
CACHE_DIT_ALIASES = {"Fn": "Fn_compute_blocks", "Bn": "Bn_compute_blocks", "threshold": "residual_diff_threshold",
                     "warmup": "max_warmup_steps"}


class Skip(Exception):
    """A row that cannot run here (a tool not installed); the message says why."""


@dataclass(frozen=True)
class Spec:
    tool: str  # full | cachepass | diffusers | cache-dit
    algo: str
    compiled: bool
    params: tuple = ()  # sorted (key, value) pairs

    @property
    def options(self) -> dict:
        return dict(self.params)

    @property
    def family(self) -> str:
        """The line a row belongs to in the frontier plot: tool, algorithm, compiled or not."""
        if self.tool == "full":
            return "full"
        if self.tool == "cachepass":
            return f"cachepass {self.algo}" + (" taylor" if "taylor" in self.options else "")
        name = {"diffusers": DIFFUSERS_ALGOS, "cache-dit": CACHE_DIT_ALGOS}[self.tool][self.algo]
        return f"{self.tool} {name}" + (" +compile" if self.compiled else "")

    @property
    def label(self) -> str:
        if self.tool == "full":
            return self.algo
        opts = " ".join(f"{k}={v}" for k, v in self.params)
        head = f"cachepass {self.algo}" if self.tool == "cachepass" else self.family
        return f"{head} {opts}".strip()


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse(method: str) -> list[Spec]:
    """One method string -> its rows (several when a value sweeps with ``|``)."""
    if method in GROUPS:
        return [s for m in GROUPS[method] for s in parse(m)]
    if method in ("eager", "compile", "inductor"):
        return [Spec("full", "eager" if method == "eager" else "compile", method != "eager")]
    if method.startswith("cachepass:"):
        _, _, rest = method.partition(":")
        algo, _, opts = rest.partition(":")
        if algo not in cachepass.POLICIES:
            raise ValueError(f"unknown cachepass policy {algo!r} in {method!r}; known: {', '.join(cachepass.POLICIES)}")
        tool, compiled = "cachepass", True
    else:
        head, _, opts = method.partition(":")
        compiled = head.endswith("+compile")
        head = head.removesuffix("+compile")
        for tool, algos in (("diffusers", DIFFUSERS_ALGOS), ("cache-dit", CACHE_DIT_ALGOS)):
            if head.startswith(tool + "-") and head[len(tool) + 1:] in algos:
                algo = head[len(tool) + 1:]
                break
        else:
            raise ValueError(f"unknown method {method!r}; see --help for the syntax and {sorted(GROUPS)} for groups")
    keys, choices = [], []
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} in {method!r} must be key=value")
        keys.append(key.strip())
        choices.append([_value(v.strip()) for v in value.split("|")])
    return [Spec(tool, algo, compiled, tuple(sorted(zip(keys, combo)))) for combo in itertools.product(*choices)]


def parse_all(methods: list[str]) -> list[Spec]:
    specs = []
    for m in methods:
        for s in parse(m):
            if s not in specs:
                specs.append(s)
    return specs


# --- applying a method ---------------------------------------------------------------------------

@dataclass
class Applied:
    """A method on one fresh pipeline: ``apply`` installs it, ``remove`` takes it off again."""

    spec: Spec
    pipe: object
    model: torch.nn.Module  # the plain transformer module (never the compiled wrapper)
    backend: str
    steps: int
    notes: list = field(default_factory=list)
    installed: bool = False  # the tool's hooks are on the model (so ``remove`` must take them off)
    defaults: dict = field(default_factory=dict)  # the workload's options for this method, under the row's

    def apply(self, generate) -> None:
        """Install the method on ``self.pipe``; ``generate()`` runs one generation (for calibration)."""

    def between_generations(self) -> None:
        """Drop state a tool keeps after a generation, so the next one starts from an empty cache."""

    def computed_steps(self) -> tuple[list[int] | None, str]:
        """Per branch, steps that ran the block stack, from the tool's own stats; ``(None, '')`` if it has none."""
        return None, ""

    def cache_bytes(self) -> int | None:
        return None

    def remove(self) -> None:
        self.pipe.transformer = self.model

    def _compile(self) -> None:
        self.pipe.transformer = torch.compile(self.model, backend=self.backend)

    def note_defaults(self) -> None:
        if self.defaults:
            self.notes.append("workload options " + ", ".join(f"{k}={v}" for k, v in self.defaults.items()))


class Full(Applied):
    def apply(self, generate) -> None:
        if self.spec.compiled:
            self._compile()


class CachePass(Applied):
    def apply(self, generate) -> None:
        from torch._dynamo.backends.registry import list_backends, register_backend

        if "cachepass" not in list_backends(exclude_tags=()):  # a source checkout, not installed
            register_backend(cachepass.cachepass_backend, name="cachepass")
        options = {"policy": self.spec.algo, "inner": self.backend, **self.defaults, **self.spec.options}
        self.note_defaults()
        targets = {k: options.pop(k) for k in CALIBRATION_TARGETS if k in options}
        if targets:  # calibrate on this workload first: one full generation, replayed (no check run)
            knobs = {k: options[k] for k in ("max_skip_steps", "retention_ratio") if k in options}
            profile = cachepass.calibrate(generate, self.model, policy=self.spec.algo, check=False, **targets,
                                          **knobs)
            self.notes.append(f"calibrated: threshold {profile.options['threshold']:.4g}, "
                              f"predicted {profile.report['predicted']['computed_steps']} computed steps")
            options["profile"] = profile
            reset_dynamo_counters()  # the recording's compile is not part of the row
        self.pipe.transformer = torch.compile(self.model, backend="cachepass", options=options)

    def between_generations(self) -> None:
        cachepass.reset(self.model)  # frees the caches; keeps the learnt step count

    def computed_steps(self):
        stats = cachepass.stats(self.model)
        if not stats.caching:
            self.notes.append(f"caching off: {stats.fallback_reason}")
            return None, ""
        return [len(s.computed_steps) for s in stats.branches], "cachepass.stats"

    def cache_bytes(self) -> int | None:
        return cachepass.stats(self.model).cache_bytes

    def remove(self) -> None:
        cachepass.reset(self.model)
        super().remove()


def _diffusers_config(algo: str, options: dict, model, steps: int, generate):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if algo == "fbcache":
        return FirstBlockCacheConfig(**options)
    if algo == "taylorseer":  # factors in the model's dtype, as diffusers' own example does
        return TaylorSeerCacheConfig(**{"taylor_factors_dtype": model.dtype, **options})
    # MagCache needs per-model magnitude ratios: the documented way is one calibration run first.
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate()
    model.disable_cache()
    lists = re.findall(r"^\[[^\]]*\]$", printed.getvalue(), flags=re.M)
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    ratios = ast.literal_eval(lists[0])  # the first context's ("cond"), as a user would copy it
    return MagCacheConfig(**{"mag_ratios": ratios, "num_inference_steps": steps, **options})


class Diffusers(Applied):
    def apply(self, generate) -> None:
        try:
            import diffusers.hooks  # noqa: F401
        except ImportError as e:  # pragma: no cover - diffusers is a core dependency
            raise Skip(f"diffusers hooks unavailable: {e}") from e
        config = _diffusers_config(self.spec.algo, self.spec.options, self.model, self.steps, generate)
        self.model.enable_cache(config)
        self.installed = True
        if self.spec.compiled:
            self._compile()

    def remove(self) -> None:
        super().remove()
        if self.installed:
            self.model.disable_cache()


class CacheDit(Applied):
    _saved: tuple | None = None

    def apply(self, generate) -> None:
        try:
            import cache_dit
        except ImportError as e:
            raise Skip(f"cache-dit not installed ({e}); pip install -e '.[bench]'") from e
        options = {CACHE_DIT_ALIASES.get(k, k): v for k, v in {**self.defaults, **self.spec.options}.items()}
        options = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, **options}  # F1B0 unless told
        self.note_defaults()
        calibrator = None
        if self.spec.algo == "dbcache-taylorseer":
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
        cache_dit.enable_cache(self.pipe, cache_config=cache_dit.DBCacheConfig(**options),
                               calibrator_config=calibrator)
        self.installed = True
        if self.spec.compiled:
            self._saved = snapshot_compile_configs()
            cache_dit.set_compile_configs()  # as cache-dit documents before torch.compile
            self._compile()

    def between_generations(self) -> None:
        # cache-dit frees its buffers when the *next* pipeline call starts; drop them now so the
        # measured generation's peak counts them (private attributes, for this measurement only).
        contexts = getattr(getattr(self.pipe, "_context_manager", None), "_cached_context_manager", None)
        if contexts is None:
            self.notes.append("could not drop cache-dit's buffers: extra MiB may undercount")
            return
        for context in contexts.values():
            context.clear_buffers()

    def computed_steps(self):
        import cache_dit

        stats = cache_dit.summary(self.model, logging=False)[0]
        cached = [stats.cached_steps, stats.cfg_cached_steps]
        return [self.steps - len(c) for c in cached], "cache_dit.summary"

    def remove(self) -> None:
        super().remove()
        if self.installed:  # also restores the pipeline class's __call__, which cache-dit patches
            import cache_dit

            cache_dit.disable_cache(self.pipe)
        if self._saved is not None:
            restore_compile_configs(self._saved)


APPLIERS = {"full": Full, "cachepass": CachePass, "diffusers": Diffusers, "cache-dit": CacheDit}


def make(spec: Spec, pipe, model, backend: str, steps: int, defaults: dict | None = None) -> Applied:
    """``defaults``: the workload's options for this method (cachepass and cache-dit rows), under the row's own."""
    return APPLIERS[spec.tool](spec, pipe, model, backend, steps, defaults=dict(defaults or {}))


def reset_dynamo_counters() -> None:
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()


def snapshot_compile_configs() -> tuple[dict, dict]:
    return torch._dynamo.config.get_config_copy(), torch._inductor.config.get_config_copy()


def restore_compile_configs(saved: tuple[dict, dict]) -> None:
    """Put back only what changed (loading every key trips deprecation warnings)."""
    for module, before in zip((torch._dynamo.config, torch._inductor.config), saved):
        now = module.get_config_copy()
        for key, value in before.items():
            if now.get(key) != value:
                setattr(module, key, value)
