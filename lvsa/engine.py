"""The per-model runtime: geometry → schedule → mask per step → dispatch, with telemetry.

Integrations (``lvsa.integrations``) create one :class:`Engine` per pipeline and call
:meth:`Engine.attention` from their attention processors. The denoising step reaches
the engine through :meth:`Engine.set_step` from the pipeline's step callback, so the
keyframe rotation follows real steps whether CFG is batched or not.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

from . import telemetry
from .config import Config, mask_log_wants
from .geometry import GeometryResult, detect_geometry
from .ops import dense_attention, validate_inputs
from .schedule import plan_schedule


class Engine:
    """Sparse attention for one model.

    Parameters
    ----------
    family : str, optional
        ``wan`` | ``hunyuan`` | ``cogvideox``: picks the default reference horizon and
        names the ``origin`` of log lines.
    config : Config, optional
        A loaded configuration; ``settings`` are applied on top as keyword arguments.
    world_size : int
        Context-parallel world size (rank-boundary frames become fixed globals).
    """

    def __init__(self, family: Optional[str] = None, config: Optional[Config] = None,
                 world_size: int = 1, **settings):
        if config is None:
            config = Config.load(**settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.family = family or "generic"
        self.world_size = world_size
        self.step = 0
        self._ppf: Tuple[int, ...] = config.candidate_ppf()
        self._expected_T: Optional[int] = config.total_latent_frames
        self._reference: int = config.reference_for(family)
        self._geo_cache: Dict[Tuple[int, int], GeometryResult] = {}
        self._gen: Dict[str, Any] = {}
        #: this generation's calls and fallbacks (fed with the session's, by telemetry)
        self.counts = telemetry.Counts()
        self._last_device = None
        self._step_t0: Optional[float] = None
        for msg in config.deprecation_notices():
            telemetry.emit("warning", message=msg)
        for msg in config.unit_notices():
            telemetry.emit("notice", message=msg)
        if config.window_size and not config.latent_window():
            telemetry.emit("warning", message=(
                f"window_size={config.window_size} video frames is W=0 latent frames "
                f"(// vae_temporal_factor {config.vae_temporal_factor}): no local window, globals only; "
                f"use LVSA_WINDOW_SIZE >= {config.vae_temporal_factor} for a window"))
        self.begin_generation(announce=False)

    # ----------------------------------------------------------- geometry
    def set_geometry(self, patches_per_frame=None, latent_frames: Optional[int] = None,
                     text_len: Optional[int] = None, reference: Optional[int] = None,
                     known_reference: Optional[int] = None, vae_temporal_factor: Optional[int] = None):
        """Geometry from the pipeline at call time; ``LVSA_*``/settings the user set win.

        ``known_reference`` is the model's training horizon; a different effective
        reference is a loud warning naming both (troubleshooting Symptom 4).
        """
        cfg = self.config
        user_ppf = cfg.is_set("patches_per_frame") or cfg.is_set("video_height") or cfg.is_set("video_width")
        if patches_per_frame is not None and not user_ppf:
            p = patches_per_frame
            self._ppf = tuple(p) if isinstance(p, (tuple, list)) else (int(p),)
        if latent_frames is not None and not cfg.is_set("total_latent_frames"):
            self._expected_T = int(latent_frames)
        if cfg.is_set("reference_latent_frames"):
            self._reference = cfg.reference_latent_frames
        elif reference is not None:
            self._reference = int(reference)
        if known_reference is not None and known_reference != self._reference:
            telemetry.emit("warning", message=(
                f"reference_latent_frames={self._reference} but this {self.family} model was trained "
                f"at {known_reference} latent frames: the schedule budget is wrong (Symptom 4); "
                f"set LVSA_REFERENCE_LATENT_FRAMES={known_reference} unless this is intended"))
        self._geo_cache.clear()

    @property
    def reference(self) -> int:
        return self._reference

    def detect(self, seq_len: int, text_len: int = 0) -> GeometryResult:
        key = (seq_len, text_len)
        g = self._geo_cache.get(key)
        if g is None:
            g = detect_geometry(seq_len + text_len, self._ppf, text_len, self.config.total_latent_frames)
            if g.ok and self._expected_T is not None and g.T != self._expected_T:
                g = GeometryResult(seq_len + text_len, text_len, reason="geometry_detect",
                                   detail={"known_ppf": list(self._ppf), "expected_T": self._expected_T,
                                           "found_T": g.T})
            self._geo_cache[key] = g
        return g

    def schedule(self, T: int, P: int):
        c = self.config
        return plan_schedule(
            T, c.latent_window(), c.latent_first_frames(), self._reference, c.sparsity_scale,
            None if c.auto_keyframes else c.latent_key_frame_interval(), c.expand_window,
            c.rotate_keyframes, self.world_size, P if self.world_size > 1 else None)

    # ------------------------------------------------------------- steps
    def begin_generation(self, announce: bool = True):
        """Start a generation: counters reset, ``engaged``/schedule lines print once again."""
        self.step = 0
        self.counts = telemetry.Counts()
        self._gen = {"backend": None,
                     "announced": set(), "mask_logged": set(), "T": None, "P": None,
                     "extension_ratio": None, "t0": time.perf_counter()}
        self._step_t0 = None
        self._calls_in_step = 0
        if announce:
            from .dispatch import check_environment
            check_environment()
            telemetry.new_generation()

    def set_step(self, step: int):
        """Called from the pipeline's step callback with the index of the step about to run."""
        now = time.perf_counter()
        self._close_step(now)
        self.step = int(step)
        self._step_t0 = now
        self._calls_in_step = 0

    def _close_step(self, now: float):
        c = self.config
        # a step opened by the last step callback that ran no attention is not a step
        if self._step_t0 is not None and self._calls_in_step:
            if c.step_time_log:
                if self._last_device is not None:
                    from .devices import synchronize
                    synchronize(self._last_device)
                    now = time.perf_counter()
                telemetry.emit("step_time", step=self.step, dt=now - self._step_t0)
            if c.mem_log and self._last_device is not None:
                from .devices import memory_stats
                st = memory_stats(self._last_device)
                if st is not None:
                    telemetry.emit("memory", step=self.step, **st)

    def end_generation(self) -> Dict[str, Any]:
        self._close_step(time.perf_counter())
        self._step_t0 = None
        g, c = self._gen, self.counts
        return {"backend": g["backend"], "sparse_calls": c.sparse_calls,
                "dense_calls": c.dense_by_design_calls, "fallbacks": c.fallback_calls,
                "fallbacks_by_reason": dict(c.fallbacks_by_reason), "T": g["T"], "P": g["P"], "reference": self._reference,
                "extension_ratio": g["extension_ratio"]}

    def consistency_key(self, seq_len: int, text_len: int = 0) -> Tuple:
        """``(T, P, L, step, offset, kfi)`` of the next call: what every context-parallel
        rank must agree on (compared across ranks under ``LVSA_CHECK=1``)."""
        geo = self.detect(seq_len, text_len)
        if not geo.ok:
            return (None, None, text_len, self.step, None, None, geo.reason)
        sched = self.schedule(geo.T, geo.P)
        return (geo.T, geo.P, text_len, self.step, sched.mask_for_step(self.step).offset,
                sched.key_frame_interval)

    def first_call_of_generation(self, tag: str) -> bool:
        """True once per generation per ``tag`` (e.g. the cross-rank check)."""
        seen = self._gen["announced"]
        if tag in seen:
            return False
        seen.add(tag)
        return True

    # --------------------------------------------------------- attention
    def fallback(self, origin, reason, seq_len, **detail):
        """Record and announce a non-sparse path (integrations call this when they hand off)."""
        telemetry.fallback(origin, reason, seq_len, self.counts, warn=self.config.warn_fallback,
                           **detail)

    def attention(self, q, k, v, text_k=None, text_v=None, scale=None, origin: Optional[str] = None,
                  q_rows: Optional[Tuple[int, int]] = None):
        """Self-attention of the video queries; see :func:`lvsa.attention` for shapes.

        ``origin`` names the call site in fallback lines (default ``forward_<device>``, e.g.
        ``forward_cuda``); the ``engaged`` line names the model family. ``q_rows=(lo, hi)``:
        ``q`` holds only those query rows (sequence parallelism); the schedule and mask are
        those of the whole sequence ``k``.
        """
        origin = origin or f"forward_{q.device.type}"
        self._calls_in_step += 1
        validate_inputs(q, k, v, None, text_k, text_v, scale, check_finite=self.config.check, q_rows=q_rows)
        S = k.shape[1]
        L = 0 if text_k is None else text_k.shape[1]
        if q.device.type != "cpu":
            self._last_device = q.device
        geo = self.detect(S, L)
        if not geo.ok:
            self.fallback(origin, geo.reason, S + L, **geo.detail)
            return dense_attention(q, k, v, text_k, text_v, scale)
        sched = self.schedule(geo.T, geo.P)
        mask = sched.mask_for_step(self.step)
        g = self._gen
        g["T"], g["P"], g["extension_ratio"] = geo.T, geo.P, sched.extension_ratio
        if ("schedule", geo.T, geo.P) not in g["announced"]:
            g["announced"].add(("schedule", geo.T, geo.P))
            s = mask.summary()
            telemetry.emit("schedule", T=geo.T, P=geo.P, reference=self._reference,
                           extension_ratio=sched.extension_ratio, kfi=sched.key_frame_interval,
                           auto=sched.auto, global_count=s.global_count, attended_max=s.attended_max,
                           attended_min=s.attended_min, sparsity=mask.sparsity())
        if self.config.mask_log is not None:
            if self.step not in g["mask_logged"] and mask_log_wants(
                    self.config.mask_log, self.step, bool(g["mask_logged"])):
                g["mask_logged"].add(self.step)
                telemetry.emit("mask", step=self.step, offset=mask.offset, sparsity=mask.sparsity(),
                               picture=mask.to_string())
        if mask.is_dense:
            out = dense_attention(q, k, v, text_k, text_v, scale)
            backend_name = "dense"
        else:
            from .dispatch import run_attention
            out, backend_name, _ = run_attention(q, k, v, mask, text_k, text_v, scale,
                                                 config=self.config, origin=origin,
                                                 validated=True, record=self.counts, q_rows=q_rows)
        if "engaged" not in g["announced"]:
            g["announced"].add("engaged")
            g["backend"] = backend_name
            telemetry.emit("engaged", origin=self.family, site=origin, T=geo.T, P=geo.P, seq_len=S + L,
                           kfi=sched.key_frame_interval, W=sched.window,
                           global_count=len(mask.globals), dense=mask.is_dense, backend=backend_name)
        if mask.is_dense:  # sparse calls are counted by the dispatcher, with their backend
            telemetry.count_call("dense", record=self.counts)
        return out
