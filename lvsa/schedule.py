"""The schedule planner: keyframe interval, rotating globals and windows.

Pure Python, device-agnostic. The semantics are those of DESIGN.md §2; every
quantity here is in *latent* frames. :func:`plan_schedule` computes all
``kfi`` rotation patterns once and caches the result, so asking for the mask of
denoising step ``s`` is a tuple lookup.

Example
-------
>>> s = plan_schedule(T=81, W=3, n=1, reference=21)
>>> s.key_frame_interval, round(s.mask_for_step(0).sparsity(), 3)
(6, 0.741)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .mask import BlockMask


# --------------------------------------------------------------------- presets
@dataclass(frozen=True)
class ModelPreset:
    """What lvsa needs to know about a model family."""

    name: str
    family: str  # adapter family: wan | hunyuan | cogvideox
    reference_latent_frames: int
    vae_temporal_factor: int
    vae_spatial_factor: int
    patch_size: int
    default_height: int
    default_width: int
    default_num_frames: int
    num_heads: int
    head_dim: int
    text_tokens: int = 0  # text tokens joined into self-attention (0 = cross-attention model)

    @property
    def default_latent_frames(self) -> int:
        return latent_frames(self.default_num_frames, self.vae_temporal_factor)

    def patches_per_frame(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        return patches_per_frame(height or self.default_height, width or self.default_width,
                                 self.vae_spatial_factor, self.patch_size)


PRESETS: Dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("wan2.1-t2v-1.3b", "wan", 21, 4, 8, 2, 480, 832, 81, 12, 128),
        ModelPreset("wan2.1-t2v-14b", "wan", 21, 4, 8, 2, 480, 832, 81, 40, 128),
        ModelPreset("wan2.2-t2v-a14b", "wan", 21, 4, 8, 2, 480, 832, 81, 40, 128),
        ModelPreset("wan2.2-ti2v-5b", "wan", 31, 4, 16, 2, 704, 1280, 121, 24, 128),
        ModelPreset("hunyuanvideo-1.5", "hunyuan", 33, 4, 16, 1, 480, 832, 129, 16, 128, 256),
        ModelPreset("cogvideox-2b", "cogvideox", 13, 4, 8, 2, 480, 720, 49, 30, 64, 226),
        ModelPreset("cogvideox-5b", "cogvideox", 13, 4, 8, 2, 480, 720, 49, 48, 64, 226),
    ]
}
ALIASES = {"wan": "wan2.1-t2v-1.3b", "wan2.1": "wan2.1-t2v-1.3b", "wan2.2": "wan2.2-t2v-a14b",
           "hunyuan": "hunyuanvideo-1.5", "hunyuanvideo": "hunyuanvideo-1.5",
           "cogvideox": "cogvideox-5b"}
# Training horizons by adapter family (the LVSA_REFERENCE_LATENT_FRAMES defaults).
FAMILY_REFERENCE = {"wan": 21, "hunyuan": 33, "cogvideox": 13}


def get_preset(name: str) -> ModelPreset:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))} "
            f"(aliases: {', '.join(sorted(ALIASES))})")
    return PRESETS[key]


# -------------------------------------------------------------------- geometry
def latent_frames(num_frames: int, vae_temporal_factor: int = 4) -> int:
    """Latent frames for ``num_frames`` video frames: ``(F - 1) // t + 1``.

    Raises ``ValueError`` when ``F`` does not fit the VAE grid (``(F-1) % t != 0``).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if vae_temporal_factor < 1:
        raise ValueError(f"vae_temporal_factor must be >= 1, got {vae_temporal_factor}")
    if (num_frames - 1) % vae_temporal_factor:
        lo = (num_frames - 1) // vae_temporal_factor * vae_temporal_factor + 1
        raise ValueError(
            f"num_frames={num_frames} does not fit the VAE temporal grid: (F-1) must be a "
            f"multiple of {vae_temporal_factor}; use {lo} or {lo + vae_temporal_factor}")
    return (num_frames - 1) // vae_temporal_factor + 1


def patches_per_frame(height: int, width: int, vae_spatial_factor: int = 8, patch_size: int = 2) -> int:
    """Tokens per latent frame ``(H / s / p) * (W / s / p)``; sizes must divide."""
    unit = vae_spatial_factor * patch_size
    if height <= 0 or width <= 0 or unit <= 0:
        raise ValueError(f"height, width and vae_spatial_factor*patch_size must be > 0, got "
                         f"{height}x{width}, {vae_spatial_factor}*{patch_size}")
    if height % unit or width % unit:
        raise ValueError(
            f"{height}x{width} is not divisible by vae_spatial_factor*patch_size = {unit}; "
            f"use multiples of {unit}, e.g. {height // unit * unit}x{width // unit * unit}")
    return (height // unit) * (width // unit)


def video_to_latent(frames: int, vae_temporal_factor: int = 4) -> int:
    """Convert a frame count given in video frames (window, first frames) to latent: ``// t``."""
    return frames // vae_temporal_factor


# ---------------------------------------------------------------- the schedule
def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def compute_key_frame_interval(T: int, W: int, n: int, reference: int, scale: float = 1.0) -> int:
    """The automatic keyframe interval of DESIGN.md §2 (1 means dense)."""
    sref = max(n + 1, math.floor(reference * scale))
    if T <= sref:
        return 1
    target = max(n, sref - min(2 * W + 1, T))
    lead = set(range(min(n, T)))
    strict = 1
    for k in range(T, 0, -1):
        grid_extra = len(lead.union(range(0, T, k)))
        if grid_extra >= target:
            strict = k
            break
    m = 2 * W + n
    fallback = math.ceil(max(T - m, sref - m) / max(sref - m, 1))
    return max(strict, fallback)


def _boundary_frames(T: int, P: int, W: int, world_size: int) -> Tuple[int, ...]:
    if world_size <= 1:
        return ()
    out = set()
    for r in range(1, world_size):
        b = (r * T * P // world_size) // P
        out.update(f for f in range(b - W, b + W + 1) if 0 <= f < T)
    return tuple(sorted(out))


def _windows(T: int, W: int, gset, expand: bool):
    if W == 0:
        return None
    is_g = [1 if f in gset else 0 for f in range(T)]
    pre = [0]
    for x in is_g:
        pre.append(pre[-1] + x)
    need = min(2 * W + 1, T - len(gset))
    out = []
    for f in range(T):
        lo = max(0, min(f - W, T - 1 - 2 * W))
        hi = min(T - 1, max(f + W, 2 * W))
        if expand:
            cnt = (hi - lo + 1) - (pre[hi + 1] - pre[lo])
            while cnt < need:
                moved = False
                if lo > 0:
                    lo -= 1
                    cnt += 1 - is_g[lo]
                    moved = True
                if cnt >= need:
                    break
                if hi < T - 1:
                    hi += 1
                    cnt += 1 - is_g[hi]
                    moved = True
                if not moved:
                    break
        out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class Schedule:
    """All rotation patterns of one geometry, computed once.

    Use :meth:`mask_for_step` (a lookup) per denoising step.
    """

    num_frames: int
    window: int
    n_first: int
    reference: int
    scale: float
    key_frame_interval: int
    auto: bool
    rotate: bool
    expand: bool
    world_size: int
    boundary_frames: Tuple[int, ...]
    masks: Tuple[BlockMask, ...]

    @property
    def dense(self) -> bool:
        """True when every step is dense by design (``T <= sref``)."""
        return all(m.is_dense for m in self.masks)

    @property
    def extension_ratio(self) -> float:
        return self.num_frames / float(self.reference)

    def offset_for_step(self, step: int) -> int:
        return step % self.key_frame_interval if self.rotate else 0

    def mask_for_step(self, step: int) -> BlockMask:
        return self.masks[self.offset_for_step(step) % len(self.masks)]

    def mask(self, offset: int) -> BlockMask:
        return self.masks[offset % len(self.masks)]

    def globals_at(self, offset: int) -> Tuple[int, ...]:
        return self.mask(offset).globals

    def windows_at(self, offset: int):
        return self.mask(offset).windows

    def to_dict(self) -> dict:
        """Plain-data view (for ``lvsa plan --json`` and budget planning)."""
        offs = []
        for m in self.masks:
            s = m.summary()
            offs.append({
                "offset": m.offset,
                "globals": list(m.globals),
                "windows": [list(w) for w in m.windows] if m.windows is not None else None,
                "attended_per_frame": [len(r) for r in m.attended_lists],
                "sparsity": round(m.sparsity(), 6),
                "global_count": s.global_count,
            })
        return {
            "T": self.num_frames, "W": self.window, "n": self.n_first,
            "reference": self.reference, "scale": self.scale,
            "key_frame_interval": self.key_frame_interval, "auto": self.auto,
            "rotate": self.rotate, "expand": self.expand, "world_size": self.world_size,
            "boundary_frames": list(self.boundary_frames), "dense": self.dense,
            "extension_ratio": round(self.extension_ratio, 6), "offsets": offs,
        }


@functools.lru_cache(maxsize=256)
def plan_schedule(T: int, W: int = 3, n: int = 1, reference: int = 21, scale: float = 1.0,
                  kfi: Optional[int] = None, expand: bool = True, rotate: bool = True,
                  world_size: int = 1, tokens_per_frame: Optional[int] = None) -> Schedule:
    """Plan every rotation pattern for one geometry (cached).

    Parameters
    ----------
    T : int
        Latent frames (>= 1).
    W : int
        Window half-width in latent frames (0 = globals only).
    n : int
        Leading global frames, latent (never rotate).
    reference : int
        The model's training horizon in latent frames.
    scale : float
        Sparsity scale (> 0; < 1 is sparser).
    kfi : int, optional
        Explicit keyframe interval; ``None`` computes it automatically.
    expand : bool
        Expanded windows (default) or plain ones.
    rotate : bool
        Shift the keyframe grid by one each denoising step.
    world_size : int
        Context-parallel world size; frames near rank boundaries become fixed globals.
    tokens_per_frame : int, optional
        ``P``: only recorded on the masks (and needed for ``world_size > 1``).
    """
    _check_int("T (latent frames)", T, 1)
    _check_int("W (window half-width)", W, 0)
    _check_int("n (leading global frames)", n, 0)
    _check_int("reference (latent frames)", reference, 1)
    _check_int("world_size", world_size, 1)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0 \
            or not math.isfinite(scale):
        raise ValueError(f"scale (sparsity scale) must be a finite number > 0, got {scale!r}")
    if kfi is not None:
        _check_int("kfi (key frame interval)", kfi, 1)
    if world_size > 1 and not tokens_per_frame:
        raise ValueError("world_size > 1 needs tokens_per_frame to place rank boundaries")
    auto = kfi is None
    k = compute_key_frame_interval(T, W, n, reference, scale) if auto else kfi
    lead = set(range(min(n, T)))
    fixed = lead.union(_boundary_frames(T, tokens_per_frame or 1, W, world_size))
    # offsets o and o+T give the same grid when kfi > T (one grid point): plan min(kfi, T)
    n_offsets = min(k, T) if rotate else 1
    masks = []
    for o in range(n_offsets):
        g = fixed.union((o + i * k) % T for i in range(math.ceil(T / k)))
        windows = _windows(T, W, g, expand)
        masks.append(BlockMask(T, tuple(sorted(g)), windows, key_frame_interval=k, offset=o,
                               tokens_per_frame=tokens_per_frame, reference_frames=reference))
    return Schedule(T, W, n, reference, float(scale), k, auto, rotate, expand, world_size,
                    tuple(sorted(fixed - lead)), tuple(masks))
