"""Video geometry: frames on the VAE grid, tokens per frame, and ``(T, P)`` detection.

Every count here is an integer; ``T`` is latent frames (after the VAE's temporal
compression, ``(F - 1) // t + 1``), ``P`` is transformer tokens per latent frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


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
    """Convert a frame count given in video frames (window, first frames, keyframe
    interval) to latent frames: ``// t``."""
    return frames // vae_temporal_factor


# ------------------------------------------------------------ model factors
@dataclass(frozen=True)
class Factors:
    """VAE and patch factors of one model: latent = video // VAE, tokens = latent // patch."""

    vae_temporal: int
    vae_spatial: int
    patch_t: int
    patch_h: int
    patch_w: int

    @property
    def spatial_multiple(self) -> Tuple[int, int]:
        """Pixel multiples that height and width must have."""
        return self.vae_spatial * self.patch_h, self.vae_spatial * self.patch_w

    def latent_frames(self, num_frames: int) -> int:
        return (int(num_frames) - 1) // self.vae_temporal + 1

    def patches_per_frame(self, height: int, width: int) -> int:
        return (int(height) // self.vae_spatial // self.patch_h) * (int(width) // self.vae_spatial // self.patch_w)


def tokens_from_latent_shape(shape, factors: Factors) -> Tuple[int, int]:
    """``(T, P)`` in transformer tokens for a ``[B, C, F, H, W]`` latent."""
    F_, H, W = shape[-3], shape[-2], shape[-1]
    return F_ // factors.patch_t, (H // factors.patch_h) * (W // factors.patch_w)


# --------------------------------------------------------- geometry detection
@dataclass(frozen=True)
class GeometryResult:
    """``(T, P)`` for a sequence, or why not (``reason`` is a fallback reason code)."""

    seq_len: int
    text_len: int
    T: Optional[int] = None
    P: Optional[int] = None
    reason: Optional[str] = None
    detail: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason is None


def detect_geometry(seq_len: int, candidates: Tuple[int, ...], text_len: int = 0,
                    total_latent_frames: Optional[int] = None) -> GeometryResult:
    """Find ``(T, P)`` with ``T * P == seq_len - text_len`` for the first candidate P that fits.

    Reasons: ``geometry_detect`` (no candidate P divides the video part) and
    ``no_t_lat`` (the sequence holds no whole latent frame, or the frame count
    disagrees with ``LVSA_TOTAL_LATENT_FRAMES``).
    """
    video = seq_len - text_len
    if video <= 0:
        return GeometryResult(seq_len, text_len, reason="no_t_lat",
                              detail={"text_len": text_len, "video_len": video})
    if total_latent_frames:
        if video % total_latent_frames == 0:
            P = video // total_latent_frames
            return GeometryResult(seq_len, text_len, total_latent_frames, P)
        return GeometryResult(seq_len, text_len, reason="no_t_lat",
                              detail={"total_latent_frames": total_latent_frames, "video_len": video})
    for P in candidates:
        if video % P == 0:
            return GeometryResult(seq_len, text_len, video // P, P)
    return GeometryResult(seq_len, text_len, reason="geometry_detect",
                          detail={"known_ppf": list(candidates)})
