"""The part of the plugin that needs no vllm: one lvsa engine per model, the step and
generation tracking, and the attention call itself.

vllm-omni hands a backend ``query``/``key``/``value`` as ``[B, S, H, D]`` plus an
``AttentionMetadata``. This module turns that into calls of the one library engine
(:class:`lvsa.engine.Engine`: same planner, backends, fallback lines and telemetry as
``lvsa.enable``) and never reimplements attention. Everything vllm-specific is read
through plain attributes, so the tests run it with stand-in metadata in lvsa's own
environment; :mod:`lvsa_vllm_omni.backend` binds it to vllm-omni's classes.

Where geometry and step come from (never from counting calls):

* geometry: ``attn_metadata.video_layout`` (Wan publishes ``prefix_len`` and the
  post-patch ``latent_grid`` ``(t, h, w)``), else the latent grid a pipeline published
  for the running forward context (:meth:`ModelRuntime.publish`, used by the
  HunyuanVideo 1.5 pipeline subclass);
* step: the forward context's ``denoise_step_idx`` (vllm-omni's own field, set by the
  pipelines' denoising loops).

A new generation starts when the step goes back or the geometry changes.
"""
from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from lvsa import telemetry
from lvsa.engine import Engine
from lvsa.integrations.joint import video_attention_with_text
from lvsa.ops import cacheable, default_scale, sdpa
from lvsa.presets import FAMILY_REFERENCE, PRESETS, WAN_TI2V

BACKEND_NAME = "LVSA"

#: model class name prefix (vllm-omni's ``model_class_name``) -> lvsa family
_FAMILY_PREFIXES = (("HunyuanVideo15", "hunyuan"), ("Wan", "wan"), ("CogVideoX", "cogvideox"))


def family_of(model_class_name: Optional[str]) -> str:
    for prefix, family in _FAMILY_PREFIXES:
        if model_class_name and model_class_name.startswith(prefix):
            return family
    return "generic"


def known_reference(family: str, model_path: Optional[str]) -> Optional[int]:
    """The model's training horizon in latent frames, where the checkpoint tells it.

    Wan 2.2 TI2V-5B (``expand_timesteps`` in ``model_index.json``, as vllm-omni's Wan
    pipeline reads it) has its own horizon (lvsa's ``wan2.2-ti2v-5b`` preset); the other
    Wan models the family's. ``None`` for a model lvsa has no preset for.
    """
    if family != "wan":
        return FAMILY_REFERENCE.get(family)
    if model_path and os.path.isfile(os.path.join(model_path, "model_index.json")):
        try:
            with open(os.path.join(model_path, "model_index.json")) as f:
                if json.load(f).get("expand_timesteps", False):
                    return PRESETS[WAN_TI2V].reference_latent_frames
        except (OSError, ValueError) as e:
            telemetry.emit("warning", message=(
                f"{os.path.join(model_path, 'model_index.json')} could not be read ({e}); using the Wan "
                f"training horizon {FAMILY_REFERENCE['wan']} latent frames (set "
                "LVSA_REFERENCE_LATENT_FRAMES if this is Wan 2.2 TI2V-5B)"))
    return FAMILY_REFERENCE["wan"]


# ----------------------------------------------------------------- geometry
@dataclass(frozen=True)
class VideoSpan:
    """The video rows of a packed sequence: ``start`` and the latent grid ``(t, h, w)``."""

    start: int
    grid: Tuple[int, int, int]

    @property
    def T(self) -> int:
        return self.grid[0]

    @property
    def P(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def length(self) -> int:
        return self.T * self.P


def span_from_layout(layout) -> Tuple[Optional[VideoSpan], Optional[str]]:
    """A :class:`VideoSpan` from a vllm-omni ``VideoTokenLayout``, or why not."""
    grid = getattr(layout, "latent_grid", None)
    if grid is not None:
        return VideoSpan(int(getattr(layout, "prefix_len", None) or 0), tuple(int(x) for x in grid)), None
    spans = tuple(getattr(layout, "video_spans", None) or ())
    if len(spans) == 1:
        s = spans[0]
        return VideoSpan(int(s.start), tuple(int(x) for x in s.latent_grid)), None
    return None, f"video_spans={len(spans)}"


def non_video_rows(start: int, length: int, seq_len: int, device) -> torch.Tensor:
    """``[seq_len - length]`` int64: the row indices ``0..start-1`` and ``start+length..seq_len-1``."""
    return torch.cat([torch.arange(0, start, device=device), torch.arange(start + length, seq_len, device=device)])


#: row indices a model keeps (geometries x text lengths x devices); more is a new request's shape
_ROW_INDEX_CACHE = 8


# --------------------------------------------------------------- the model
class ModelRuntime:
    """One lvsa :class:`Engine` per served model, plus what vllm-omni told it.

    Every ``LVSAAttentionImpl`` of a model (all layers, both Wan 2.2 A14B experts)
    shares it, so the schedule is planned once and the ``[LVSA]`` lines print once
    per generation. Settings come from ``LVSA_*`` / ``LVSA_CONFIG`` (vllm-omni's
    per-role config has no room for backend settings).
    """

    def __init__(self, family: str = "generic", reference: Optional[int] = None, **settings):
        self.family = family
        self.engine = Engine(family=family, **settings)
        self.model_reference = reference
        self._lock = threading.Lock()
        self._span: Optional[VideoSpan] = None
        self._step: Optional[int] = None
        self._started = False
        self._published: Optional[Tuple[Any, Tuple[int, int, int]]] = None
        self._warned_no_step = False
        self._other_rows: Dict[Tuple[int, int, int, torch.device], torch.Tensor] = {}
        self.generations = 0

    # -- published by a pipeline (HunyuanVideo 1.5 publishes no video_layout)
    def publish(self, context, grid: Tuple[int, int, int]) -> None:
        """Record the latent grid ``(t, h, w)`` (post-patch) for this forward context.

        It is valid only while ``context`` is the running forward context: a later
        request (a new context) never sees a stale grid.
        """
        ref = _ref(context) if context is not None else None
        self._published = (ref, tuple(int(x) for x in grid))

    def published_grid(self, context) -> Optional[Tuple[int, int, int]]:
        p = self._published
        if p is None or context is None or p[0] is None or p[0]() is not context:
            return None
        return p[1]

    # -- step and generation tracking
    def observe(self, span: VideoSpan, step: Optional[int]) -> None:
        """Follow vllm-omni's step and geometry; start a generation when either goes back/changes."""
        with self._lock:
            new = (not self._started or span.grid != (self._span.grid if self._span else None)
                   or (step is not None and self._step is not None and step < self._step))
            if new:
                if self._started:
                    self.engine.end_generation()
                self.engine.begin_generation(announce=self._started)
                self.engine.set_geometry(patches_per_frame=span.P, latent_frames=span.T,
                                         reference=self.model_reference,
                                         known_reference=self.model_reference)
                self._started = True
                self._span = span
                self._step = None
                self.generations += 1
            if step is None:
                if not self._warned_no_step:
                    self._warned_no_step = True
                    telemetry.emit("warning", message=(
                        "no denoising step published (forward context denoise_step_idx is None): "
                        "the keyframes do not rotate; the pipeline should call "
                        "set_forward_context_denoise_step_idx (Wan and the lvsa HunyuanVideo 1.5 "
                        "pipeline do)"))
            elif step != self._step:
                self.engine.set_step(step)
                self._step = step

    def other_rows(self, start: int, length: int, seq_len: int, device) -> torch.Tensor:
        """Indices of the rows outside the video span ``start:start+length`` of a sequence of
        ``seq_len`` (text, padding): built once per (geometry, text length, device) and shared
        by every layer and step of the model (a new geometry replaces the old ones). A normal
        tensor even when first built under ``torch.inference_mode()``: a later call under
        autograd indexes K/V with it (``index_select`` saves it for backward)."""
        key = (start, length, seq_len, torch.device(device))
        idx = self._other_rows.get(key)
        if idx is None:
            with cacheable():
                idx = non_video_rows(start, length, seq_len, key[3])
            with self._lock:
                if len(self._other_rows) >= _ROW_INDEX_CACHE:
                    self._other_rows.clear()
                self._other_rows[key] = idx
        return idx

    @property
    def step(self) -> Optional[int]:
        return self._step

    @property
    def span(self) -> Optional[VideoSpan]:
        return self._span

    def summary(self) -> Dict[str, Any]:
        return self.engine.end_generation()


def _ref(obj) -> Callable[[], Any]:
    """A weak reference where the object allows one, else a strong one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class _Registry:
    """Model runtimes by diffusion config (one per served model in a process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_id: Dict[int, Tuple[Any, ModelRuntime]] = {}

    def get(self, od_config, create: bool = True) -> Optional[ModelRuntime]:
        key = id(od_config) if od_config is not None else 0
        with self._lock:
            hit = self._by_id.get(key)
            if hit is not None and (od_config is None or hit[0]() is od_config):
                return hit[1]
            if not create:
                return None
            family = family_of(getattr(od_config, "model_class_name", None))
            rt = ModelRuntime(family, known_reference(family, getattr(od_config, "model", None)))
            ref = _ref(od_config) if od_config is not None else None
            self._by_id[key] = (ref, rt)
            return rt

    def clear(self):
        with self._lock:
            self._by_id.clear()


RUNTIMES = _Registry()


def runtime_for(od_config, create: bool = True) -> Optional[ModelRuntime]:
    """The :class:`ModelRuntime` of the model whose diffusion config is ``od_config``."""
    return RUNTIMES.get(od_config, create)


# ------------------------------------------------------------ the context
@dataclass
class ForwardInfo:
    """What the running forward context says: the context itself, its config, the step."""

    context: Any = None
    od_config: Any = None
    step: Optional[int] = None


def _no_context() -> ForwardInfo:
    return ForwardInfo()


#: replaced by :mod:`lvsa_vllm_omni.backend` with a reader of vllm-omni's forward context
read_forward_context: Callable[[], ForwardInfo] = _no_context


# ------------------------------------------------------------ attention
def _key_mask(attn_mask, B: int, Skv: int):
    """vllm-omni's 2D mask ``[B, Skv]`` marks valid keys (its SDPA backend broadcasts it
    over the queries). Returns it as bool, or ``None`` if there is none."""
    if attn_mask is None:
        return None
    if attn_mask.dim() != 2 or attn_mask.shape[0] != B or attn_mask.shape[1] != Skv:
        raise _Unsupported("attention_mask", {"mask_shape": "x".join(map(str, attn_mask.shape))})
    return attn_mask.to(torch.bool)


class _Unsupported(Exception):
    def __init__(self, reason: str, detail: Optional[dict] = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or {}


def dense_masked(q, k, v, scale: float, key_mask=None, causal: bool = False):
    """Dense attention with vllm-omni's SDPA semantics (a 2D mask masks keys)."""
    if causal:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kt.shape[1] != qt.shape[1]:
            rep = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        return o.transpose(1, 2)
    m = None
    if key_mask is not None:
        m = key_mask.to(torch.bool)
        m = m.view(m.shape[0], 1, 1, m.shape[1]) if m.dim() == 2 else m
    return sdpa(q, k, v, scale, attn_mask=m)


class LVSAImplCore:
    """Everything ``LVSAAttentionImpl`` does, with no vllm import.

    Parameters are those vllm-omni passes to every attention implementation.
    """

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: Optional[int] = None, prefix: str = "", backend_kwargs: Optional[dict] = None,
                 od_config=None, **extra_impl_args):
        self.num_heads = num_heads
        self.head_size = head_size
        self.softmax_scale = float(softmax_scale) if softmax_scale else default_scale(head_size)
        self.causal = bool(causal)
        self.num_kv_heads = num_kv_heads or num_heads
        self.prefix = prefix
        self.role = extra_impl_args.get("role", "self")
        if backend_kwargs:
            raise ValueError(
                f"the LVSA backend takes no per-role options (got {sorted(backend_kwargs)}); "
                "set lvsa's settings with LVSA_* variables or LVSA_CONFIG")
        # one engine per model: created now so that a bad LVSA_* value fails at model build
        self.runtime = runtime_for(od_config)

    def _fallback(self, rt: ModelRuntime, origin: str, reason: str, q, k, v, key_mask, **detail):
        rt.engine.fallback(origin, reason, q.shape[1], **detail)
        return dense_masked(q, k, v, self.softmax_scale, key_mask, self.causal)

    def run(self, query, key, value, attn_metadata=None, origin: str = "forward_cuda"):
        """Attention of ``[B, S, H, D]`` tensors described by ``attn_metadata``."""
        info = read_forward_context()
        rt = self.runtime
        B, S = query.shape[:2]
        Skv = key.shape[1]
        meta = attn_metadata
        try:
            key_mask = _key_mask(getattr(meta, "attn_mask", None), B, Skv)
        except _Unsupported as e:  # 4D or odd masks: run them exactly as given
            rt.engine.fallback(origin, e.reason, S, **e.detail)
            return dense_masked(query, key, value, self.softmax_scale, meta.attn_mask)
        if self.causal:
            return self._fallback(rt, origin, "causal", query, key, value, key_mask)
        if S != Skv:  # AllGather-KV (local queries, gathered keys) or cross-attention
            return self._fallback(rt, origin, "kv_length_mismatch", query, key, value, key_mask, kv_len=Skv)
        for name in ("full_attn_spans", "query_ranges", "packed_padding"):
            if getattr(meta, name, None) is not None:
                return self._fallback(rt, origin, "unsupported_metadata", query, key, value, key_mask,
                                      field=name)
        span, why = None, None
        layout = getattr(meta, "video_layout", None)
        if layout is not None:
            span, why = span_from_layout(layout)
        else:
            grid = rt.published_grid(info.context)
            if grid is not None:
                span = VideoSpan(0, grid)
        if span is None:
            detail = {"why": why} if why else {}
            return self._fallback(rt, origin, "no_geometry", query, key, value, key_mask, **detail)
        if span.start < 0 or span.start + span.length > S:
            return self._fallback(rt, origin, "no_geometry", query, key, value, key_mask,
                                  video_tokens=span.length, start=span.start)
        a, n = span.start, span.length
        if key_mask is not None and not bool(key_mask[:, a:a + n].all()):
            return self._fallback(rt, origin, "attention_mask", query, key, value, key_mask)
        rt.observe(span, info.step)
        return self._sparse(rt, origin, query, key, value, key_mask, a, n)

    def _sparse(self, rt, origin, q, k, v, key_mask, a: int, n: int):
        S = q.shape[1]
        eng = rt.engine
        scale = self.softmax_scale
        if a == 0 and n == S:  # video only (Wan without padding)
            return eng.attention(q, k, v, scale=scale, origin=origin)
        other = rt.other_rows(a, n, S, q.device)
        qv, kv_, vv = q[:, a:a + n], k[:, a:a + n], v[:, a:a + n]
        ko, vo = k.index_select(1, other), v.index_select(1, other)
        out = torch.empty_like(q)
        # video queries: sparse over the video keys, dense over every valid other key (text, padding
        # that is not masked); merged exactly by the engine's backend
        valid = None if key_mask is None else key_mask.index_select(1, other)
        out[:, a:a + n] = video_attention_with_text(eng, qv, kv_, vv, ko, vo, valid, scale=scale, origin=origin)
        # the other queries (text, padding): dense over all keys with the mask, as vllm-omni's SDPA does
        if other.numel():
            out[:, other] = dense_masked(q.index_select(1, other), k, v, scale, key_mask).to(q.dtype)
        return out


def ring_fallback(seq_len: int) -> None:
    """Announce that ring sequence parallelism runs dense for an LVSA layer."""
    info = read_forward_context()
    rt = runtime_for(info.od_config)
    rt.engine.fallback("ring_attention", "ring_parallel", seq_len)
