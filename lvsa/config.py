"""lvsa configuration: one object from keyword arguments, ``LVSA_CONFIG`` and ``LVSA_*``.

Precedence (highest first), documented in the README:

1. keyword arguments (``Config.load(window_size=16)``, ``lvsa.enable(pipe, ...)``, CLI flags)
2. ``LVSA_CONFIG`` — a JSON object whose keys are field names (``"window_size"``) or
   variable names (``"LVSA_WINDOW_SIZE"``); it overrides every single ``LVSA_*`` variable
3. the individual ``LVSA_*`` environment variables
4. the defaults below

Every bad value raises ``ValueError`` naming the variable, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .geometry import GeometryResult, detect_geometry, patches_per_frame, video_to_latent  # noqa: F401
from .presets import FAMILY_REFERENCE

DEFAULT_PPF = (1560,)


# ------------------------------------------------------------------ parsers
def _fail(var, value, allowed):
    raise ValueError(f"{var}={value!r} is invalid: expected {allowed}")


def _p_int(lo):
    def parse(var, value):
        if isinstance(value, bool):
            _fail(var, value, f"an integer >= {lo}")
        try:
            v = int(str(value).strip())
        except (TypeError, ValueError):
            _fail(var, value, f"an integer >= {lo}")
        if v < lo:
            _fail(var, value, f"an integer >= {lo}")
        return v
    return parse


def _p_opt_int(lo):
    inner = _p_int(lo)

    def parse(var, value):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
            return None
        return inner(var, value)
    return parse


def _p_float(lo, strict):
    allowed = f"a finite number {'>' if strict else '>='} {lo:g}"

    def parse(var, value):
        try:
            v = float(str(value).strip()) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            v = None
        if v is None or not math.isfinite(v) or v < lo or (strict and v == lo):
            _fail(var, value, allowed)
        return v
    return parse


_p_pos_float = _p_float(0.0, strict=True)
_p_nonneg_float = _p_float(0.0, strict=False)


def _p_bool(var, value):
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    _fail(var, value, "one of 1/0, true/false, yes/no, on/off")


def _p_ppf(var, value):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for it in items:
        s = str(it).strip()
        if not s.isdigit() or int(s) <= 0:
            _fail(var, value, "a comma list of positive integers, e.g. 1560,880")
        out.append(int(s))
    if not out:
        _fail(var, value, "a comma list of positive integers, e.g. 1560,880")
    return tuple(out)


def _p_backend(var, value):
    s = str(value).strip()
    if not s or not all(c.isalnum() or c in "-_." for c in s):
        _fail(var, value, "a backend name (letters, digits, - _ .) or 'auto'")
    return s


def _p_opt_path(var, value):
    if value is None:
        return None
    s = str(value).strip()
    return os.path.expanduser(s) if s else None


def _p_choice(var, value, choices):
    s = str(value).strip().lower()
    if s not in choices:
        _fail(var, value, "one of " + ", ".join(choices))
    return s


def parse_mask_log(var, value):
    """``1`` every step, ``once``, ``N``, ``N-M``, ``N,M,K``; returns a spec tuple or None."""
    if value is None:
        return None
    s = str(value).strip().lower()
    if s in ("", "0", "off", "false"):
        return None
    if s in ("1", "all", "true", "on"):
        return ("all",)
    if s == "once":
        return ("once",)
    try:
        if "-" in s:
            a, b = (int(x) for x in s.split("-", 1))
            if a < 0 or b < a:
                raise ValueError
            return ("range", a, b)
        steps = tuple(int(x) for x in s.split(","))
        if any(x < 0 for x in steps):
            raise ValueError
        return ("steps",) + steps
    except ValueError:
        _fail(var, value, "1 (every step), once, N, N-M or N,M,K (step numbers >= 0)")


def mask_log_wants(spec, step: int, already_logged: bool) -> bool:
    if spec is None:
        return False
    kind = spec[0]
    if kind == "all":
        return True
    if kind == "once":
        return not already_logged
    if kind == "range":
        return spec[1] <= step <= spec[2]
    return step in spec[1:]


#: the parsers, for backends and plugins declaring their own settings (:class:`Setting`)
p_int = _p_int
p_opt_int = _p_opt_int
p_float = _p_float
p_bool = _p_bool


def p_str(var, value):
    return str(value)


# ------------------------------------------------------------------ fields
def _f(default, parser, env, doc):
    return field(default=default, metadata={"parse": parser, "env": env, "doc": doc})


@dataclass(frozen=True)
class Config:
    """Every lvsa setting. Build with :meth:`Config.load`, not the constructor."""

    window_size: int = _f(12, _p_int(0), "LVSA_WINDOW_SIZE", "window half-width, video frames")
    n_first_frames: int = _f(4, _p_int(0), "LVSA_N_FIRST_FRAMES", "leading global frames, video frames")
    key_frame_interval: int = _f(16, _p_int(1), "LVSA_KEY_FRAME_INTERVAL",
                                 "fixed keyframe interval when auto is off, video frames "
                                 "(// vae_temporal_factor: 16 = 4 latent)")
    auto_keyframes: bool = _f(True, _p_bool, "LVSA_AUTO_KEYFRAMES", "compute kfi from the reference horizon")
    rotate_keyframes: bool = _f(True, _p_bool, "LVSA_ROTATE_KEYFRAMES", "shift the keyframe grid each step")
    expand_window: bool = _f(True, _p_bool, "LVSA_EXPAND_WINDOW", "expanded windows")
    sparsity_scale: float = _f(1.0, _p_pos_float, "LVSA_SPARSITY_SCALE",
                               "multiplier on the attention budget (<1 sparser)")
    reference_latent_frames: Optional[int] = _f(None, _p_opt_int(1), "LVSA_REFERENCE_LATENT_FRAMES",
                                                "training horizon; " + ", ".join(
                                                    f"{v} {k}" for k, v in FAMILY_REFERENCE.items()))
    backend: str = _f("auto", _p_backend, "LVSA_BACKEND", "backend name or auto")
    patches_per_frame: Optional[Tuple[int, ...]] = _f(None, _p_ppf, "LVSA_PATCHES_PER_FRAME",
                                                      "candidate P values, comma list")
    video_height: Optional[int] = _f(None, _p_opt_int(1), "LVSA_VIDEO_HEIGHT", "derive P (with width)")
    video_width: Optional[int] = _f(None, _p_opt_int(1), "LVSA_VIDEO_WIDTH", "derive P (with height)")
    vae_spatial_factor: int = _f(8, _p_int(1), "LVSA_VAE_SPATIAL_FACTOR", "VAE spatial factor")
    patch_size: int = _f(2, _p_int(1), "LVSA_PATCH_SIZE", "transformer patch size")
    vae_temporal_factor: int = _f(4, _p_int(1), "LVSA_VAE_TEMPORAL_FACTOR", "video <-> latent frames")
    total_latent_frames: Optional[int] = _f(None, _p_opt_int(1), "LVSA_TOTAL_LATENT_FRAMES", "override T")
    warn_fallback: bool = _f(True, _p_bool, "LVSA_WARN_FALLBACK", "print fallback lines")
    mask_log: Optional[tuple] = _f(None, parse_mask_log, "LVSA_MASK_LOG", "1, once, N, N-M, N,M,K")
    mem_log: bool = _f(False, _p_bool, "LVSA_MEM_LOG", "per-step memory lines")
    step_time_log: bool = _f(False, _p_bool, "LVSA_STEP_TIME_LOG", "per-step time lines")
    schedule_start: float = _f(0.0, _p_nonneg_float, "LVSA_SCHEDULE_START",
                               "deprecated: use LVSA_SPARSITY_SCALE")
    schedule_end: float = _f(0.0, _p_nonneg_float, "LVSA_SCHEDULE_END", "deprecated: use LVSA_SPARSITY_SCALE")
    check: bool = _f(False, _p_bool, "LVSA_CHECK", "validate inputs (finite values) on every call")
    strict: bool = _f(False, _p_bool, "LVSA_STRICT", "re-raise backend errors instead of falling back")
    riflex: bool = _f(False, _p_bool, "LVSA_RIFLEX",
                      "RIFLEx: past the reference, lower the intrinsic temporal RoPE frequency")
    riflex_k: Optional[int] = _f(None, _p_opt_int(1), "LVSA_RIFLEX_K",
                                 "RIFLEx component (1-based); auto = first whose period spans the reference")
    wan_hook: bool = _f(True, _p_bool, "LVSA_WAN_HOOK",
                        "accepted for compatibility: under context parallelism lvsa installs its "
                        "own split/gather hooks for Wan (no diffusers _cp_plan needed)")
    context_parallel: str = _f("off", lambda var, v: _p_choice(var, v, ("off", "auto", "ulysses", "sequence")),
                               "LVSA_CONTEXT_PARALLEL",
                               "multi-GPU split: off, auto (ulysses when heads divide), ulysses, sequence")
    dist_timeout: float = _f(600.0, _p_pos_float, "LVSA_DIST_TIMEOUT",
                             "seconds a rank waits in a collective before the run ends with an error")
    log_all_ranks: bool = _f(False, _p_bool, "LVSA_LOG_ALL_RANKS",
                             "every rank prints [LVSA] lines, prefixed with its rank (default: rank 0 only)")

    autotune: bool = _f(False, _p_bool, "LVSA_AUTOTUNE",
                        "auto selection: time each able backend once (short probe) for a device/shape "
                        "class the shipped cost table lacks; results cached on disk")
    cost_cache: Optional[str] = _f(None, _p_opt_path, "LVSA_COST_CACHE",
                                   "file of cached probe results (default ~/.cache/lvsa/probe-costs.json)")

    # -------------------------------------------------------------- loading
    @classmethod
    def fields_by_env(cls) -> Dict[str, dataclasses.Field]:
        return {f.metadata["env"]: f for f in dataclasses.fields(cls)}

    @classmethod
    def load(cls, env: Optional[Mapping[str, str]] = None, **kwargs: Any) -> "Config":
        """Build the configuration (kwargs > ``LVSA_CONFIG`` > ``LVSA_*`` > defaults)."""
        env = os.environ if env is None else env
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        by_env = cls.fields_by_env()
        values: Dict[str, Any] = {}
        sources: Dict[str, str] = {}
        for var, f in by_env.items():
            if var in env:
                values[f.name] = f.metadata["parse"](var, env[var])
                sources[f.name] = var
        raw = env.get("LVSA_CONFIG")
        if raw is not None and raw.strip():
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"LVSA_CONFIG is not valid JSON ({e.msg} at char {e.pos}): {raw!r}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"LVSA_CONFIG must be a JSON object, got {type(obj).__name__}: {raw!r}")
            for key, val in obj.items():
                f = by_name.get(key) or by_env.get(key)
                if f is None:
                    raise ValueError(
                        f"LVSA_CONFIG has unknown key {key!r}; allowed: {', '.join(sorted(by_name))} "
                        f"(or their LVSA_* names)")
                values[f.name] = f.metadata["parse"](f"LVSA_CONFIG[{key!r}]", val)
                sources[f.name] = "LVSA_CONFIG"
        for key, val in kwargs.items():
            if val is None:
                continue
            f = by_name.get(key)
            if f is None:
                raise ValueError(f"unknown lvsa setting {key!r}; allowed: {', '.join(sorted(by_name))}")
            values[key] = f.metadata["parse"](key, val)
            sources[key] = "argument"
        cfg = cls(**values)
        object.__setattr__(cfg, "_sources", sources)
        cfg._check_video_frames()
        for msg in cfg.deprecation_notices():
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
        return cfg

    def _check_video_frames(self):
        """A keyframe interval the user set in video frames must be a latent frame at least."""
        if self.is_set("key_frame_interval") and self.latent_key_frame_interval(clamp=False) < 1:
            t = self.vae_temporal_factor
            src = self.sources["key_frame_interval"]
            var = "LVSA_KEY_FRAME_INTERVAL" if src.startswith("LVSA_") else src
            raise ValueError(
                f"{var}={self.key_frame_interval} is in video frames: // vae_temporal_factor {t} "
                f"gives 0 latent frames; use a multiple of {t} (16 video frames = {16 // t} latent)")

    def deprecation_notices(self) -> List[str]:
        """One message per deprecated setting in use (the engine prints them as
        ``[LVSA] WARNING`` lines; :meth:`load` also raises them as DeprecationWarning)."""
        out = []
        for name, var in (("schedule_start", "LVSA_SCHEDULE_START"), ("schedule_end", "LVSA_SCHEDULE_END")):
            if getattr(self, name):
                out.append(f"{var}={getattr(self, name)} is deprecated and has no effect on the "
                           "schedule; use LVSA_SPARSITY_SCALE (e.g. 0.8 for a sparser run)")
        return out

    def unit_notices(self) -> List[str]:
        """One message per setting whose unit changed, when the user set it through the
        environment (the engine prints each once per process as an ``[LVSA]`` line):
        ``LVSA_KEY_FRAME_INTERVAL`` counts video frames (as the published implementation),
        no longer latent frames. The value means what the message says; nothing is changed."""
        src = self.sources.get("key_frame_interval")
        if src not in ("LVSA_KEY_FRAME_INTERVAL", "LVSA_CONFIG"):
            return []
        name = "LVSA_KEY_FRAME_INTERVAL" if src != "LVSA_CONFIG" else "LVSA_CONFIG key_frame_interval"
        t = self.vae_temporal_factor
        msg = (f"{name}={self.key_frame_interval} is in video frames (earlier lvsa builds read latent "
               f"frames): fixed keyframe interval {self.latent_key_frame_interval()} latent frames "
               f"({self.key_frame_interval} // vae_temporal_factor {t})")
        if self.auto_keyframes:
            msg += "; unused while LVSA_AUTO_KEYFRAMES=1"
        return [msg]

    def replace(self, **kwargs) -> "Config":
        by_name = {f.name: f for f in dataclasses.fields(self)}
        parsed = {}
        for k, v in kwargs.items():
            if k not in by_name:
                raise ValueError(f"unknown lvsa setting {k!r}")
            parsed[k] = v if v is None else by_name[k].metadata["parse"](k, v)
        new = dataclasses.replace(self, **parsed)
        object.__setattr__(new, "_sources", {**self.sources, **{k: "argument" for k in kwargs}})
        new._check_video_frames()
        return new

    @property
    def sources(self) -> Dict[str, str]:
        """Where each non-default field came from (variable name, ``LVSA_CONFIG`` or ``argument``)."""
        return dict(getattr(self, "_sources", {}))

    def is_set(self, name: str) -> bool:
        return name in self.sources

    # ----------------------------------------------------------- derived
    def latent_window(self) -> int:
        return video_to_latent(self.window_size, self.vae_temporal_factor)

    def latent_first_frames(self) -> int:
        return video_to_latent(self.n_first_frames, self.vae_temporal_factor)

    def latent_key_frame_interval(self, clamp: bool = True) -> int:
        """``key_frame_interval`` (video frames) in latent frames, like the window and the
        first frames: ``// vae_temporal_factor`` (16 → 4), at least 1."""
        k = video_to_latent(self.key_frame_interval, self.vae_temporal_factor)
        return max(1, k) if clamp else k

    def reference_for(self, family: Optional[str] = None) -> int:
        if self.reference_latent_frames is not None:
            return self.reference_latent_frames
        if family in FAMILY_REFERENCE:
            return FAMILY_REFERENCE[family]
        return FAMILY_REFERENCE["wan"]

    def candidate_ppf(self) -> Tuple[int, ...]:
        """Candidate tokens-per-frame: ``LVSA_PATCHES_PER_FRAME``, else derived from the
        resolution variables, else 1560."""
        if self.patches_per_frame:
            return self.patches_per_frame
        if self.video_height or self.video_width:
            if not (self.video_height and self.video_width):
                raise ValueError(
                    "LVSA_VIDEO_HEIGHT and LVSA_VIDEO_WIDTH must be set together "
                    f"(got height={self.video_height}, width={self.video_width})")
            try:
                return (patches_per_frame(self.video_height, self.video_width,
                                          self.vae_spatial_factor, self.patch_size),)
            except ValueError as e:
                raise ValueError(f"LVSA_VIDEO_HEIGHT/LVSA_VIDEO_WIDTH: {e}") from None
        return DEFAULT_PPF

    def active_env(self, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        env = os.environ if env is None else env
        keys = set(self.fields_by_env()) | {"LVSA_CONFIG", "LVSA_LOAD_PLUGINS"}
        return {k: env[k] for k in sorted(env) if k in keys or k.startswith("LVSA_")}


@functools.lru_cache(maxsize=16)
def _config_for(env_items: tuple) -> Config:
    return Config.load(env=dict(env_items))


def current_config() -> Config:
    """The configuration from the current ``LVSA_*`` environment (cached per environment)."""
    items = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("LVSA_")))
    return _config_for(items)


# ------------------------------------------------- settings owned elsewhere
@dataclass(frozen=True)
class Setting:
    """A variable owned by a backend or plugin (``Backend.settings``, or the
    ``lvsa_settings`` hook): listed by ``lvsa info --vars`` and parsed like a
    :class:`Config` field (a bad value is a ``ValueError`` naming the variable).

    ``parse(var, raw)`` turns the raw string into the value (use the ``p_*`` parsers of
    this module or raise ``ValueError`` naming ``var``); ``default`` is returned unset.
    """

    env: str
    parse: Callable[[str, Any], Any]
    default: Any = None
    doc: str = ""
    owner: str = ""

    def read(self, env: Optional[Mapping[str, str]] = None) -> Any:
        env = os.environ if env is None else env
        raw = env.get(self.env)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return self.default
        return self.parse(self.env, raw)


#: names lvsa itself reads besides the Config fields
CORE_VARIABLES = ("LVSA_CONFIG", "LVSA_LOAD_PLUGINS")


def known_variables(extra: Iterable[Setting] = ()) -> List[str]:
    return sorted(set(Config.fields_by_env()) | set(CORE_VARIABLES) | {s.env for s in extra})


def unknown_variables(env: Optional[Mapping[str, str]] = None,
                      extra: Iterable[Setting] = ()) -> Dict[str, Optional[str]]:
    """``LVSA_*`` names in ``env`` that nothing reads → the nearest known name (or None)."""
    env = os.environ if env is None else env
    known = known_variables(extra)
    out: Dict[str, Optional[str]] = {}
    for k in sorted(env):
        if k.startswith("LVSA_") and k not in known:
            # compare without the shared prefix, so LVSA_FOO is not "near" everything
            near = difflib.get_close_matches(k[5:], [n[5:] for n in known], n=1, cutoff=0.6)
            out[k] = "LVSA_" + near[0] if near else None
    return out


def env_table(extra: Iterable[Setting] = ()) -> str:
    """Markdown table of every variable (used by ``lvsa info --vars`` and the README);
    ``extra``: settings declared by installed backends and plugins."""
    rows = ["| variable | field | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        rows.append(f"| {f.metadata['env']} | {f.name} | {f.default!r} | {f.metadata['doc']} |")
    for st in sorted(extra, key=lambda x: x.env):
        rows.append(f"| {st.env} | ({st.owner or 'plugin'}) | {st.default!r} | {st.doc} |")
    return "\n".join(rows)
