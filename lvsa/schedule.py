"""The schedule planner: keyframe interval, rotating globals and windows.

Pure Python, device-agnostic. The semantics are those of DESIGN.md §2; every
quantity here is in *latent* frames. :func:`plan_schedule` computes the keyframe
interval up front; each rotation pattern is built (``O(T)`` memory) the first time a
step asks for it and kept in a small per-schedule cache, so asking for the mask of
denoising step ``s`` is a lookup after its first use.

Example
-------
>>> s = plan_schedule(T=81, W=3, n=1, reference=21)
>>> s.key_frame_interval, round(s.mask_for_step(0).sparsity(), 3)
(6, 0.741)
"""
from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import PlanTooLarge
from .geometry import latent_frames, patches_per_frame, video_to_latent  # noqa: F401 (re-export)
from .mask import BlockMask
from .presets import ALIASES, FAMILY_REFERENCE, PRESETS, ModelPreset, get_preset  # noqa: F401


#: The longest schedule lvsa plans, in latent frames (262141 video frames at the VAE's
#: temporal factor 4, about 4.5 hours at 16 fps). Past it :func:`plan_schedule` raises
#: :class:`~lvsa.errors.PlanTooLarge` before planning anything. Planning is ``O(T)``
#: memory per rotation pattern (patterns are built when a step first asks for one).
MAX_LATENT_FRAMES = 65536

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


#: rotation patterns kept per schedule (a generation of 50 steps uses at most 50)
_MASKS_KEPT = 64


@dataclass(frozen=True)
class Schedule:
    """The rotation patterns of one geometry: the keyframe interval is computed once, each
    pattern (a :class:`BlockMask`) when first asked for.

    Use :meth:`mask_for_step` per denoising step.
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
    tokens_per_frame: Optional[int] = None
    _memo: "OrderedDict" = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    @property
    def num_offsets(self) -> int:
        """Distinct rotation patterns: ``min(kfi, T)`` (offsets ``o`` and ``o + T`` give the
        same grid), 1 without rotation."""
        return min(self.key_frame_interval, self.num_frames) if self.rotate else 1

    def _build(self, o: int) -> BlockMask:
        T, k = self.num_frames, self.key_frame_interval
        fixed = set(range(min(self.n_first, T))).union(self.boundary_frames)
        g = fixed.union((o + i * k) % T for i in range(math.ceil(T / k)))
        return BlockMask(T, tuple(sorted(g)), _windows(T, self.window, g, self.expand),
                         key_frame_interval=k, offset=o, tokens_per_frame=self.tokens_per_frame,
                         reference_frames=self.reference)

    def mask(self, offset: int) -> BlockMask:
        """The pattern of rotation ``offset`` (taken modulo the number of patterns)."""
        o = offset % self.num_offsets
        with self._lock:
            hit = self._memo.get(o)
            if hit is not None:
                self._memo.move_to_end(o)
                return hit
        m = self._build(o)
        with self._lock:
            m = self._memo.setdefault(o, m)
            while len(self._memo) > _MASKS_KEPT:
                self._memo.popitem(last=False)
        return m

    @property
    def masks(self) -> Tuple[BlockMask, ...]:
        """Every pattern (builds all ``min(kfi, T)``: ``O(T * kfi)``; prefer :meth:`mask`)."""
        return tuple(self.mask(o) for o in range(self.num_offsets))

    @property
    def dense(self) -> bool:
        """True when every step is dense by design (``T <= sref``)."""
        if self.key_frame_interval == 1 or 2 * self.window + 1 >= self.num_frames:
            return True
        return all(self.mask(o).is_dense for o in range(self.num_offsets))

    @property
    def extension_ratio(self) -> float:
        return self.num_frames / float(self.reference)

    def offset_for_step(self, step: int) -> int:
        return step % self.key_frame_interval if self.rotate else 0

    def mask_for_step(self, step: int) -> BlockMask:
        return self.mask(self.offset_for_step(step))

    def globals_at(self, offset: int) -> Tuple[int, ...]:
        return self.mask(offset).globals

    def windows_at(self, offset: int):
        return self.mask(offset).windows

    def to_dict(self) -> dict:
        """Plain-data view (for ``lvsa plan --json`` and budget planning)."""
        offs = []
        for o in range(self.num_offsets):
            m = self.mask(o)
            s = m.summary()
            offs.append({
                "offset": m.offset,
                "globals": list(m.globals),
                "windows": [list(w) for w in m.windows] if m.windows is not None else None,
                "attended_per_frame": list(m.attended_counts),
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
    if T > MAX_LATENT_FRAMES:
        raise PlanTooLarge(
            f"T={T} latent frames is beyond the longest schedule lvsa plans "
            f"({MAX_LATENT_FRAMES} latent frames, lvsa.schedule.MAX_LATENT_FRAMES); "
            "generate a shorter video or check the frame count (latent, not video frames)")
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
    boundary = set(_boundary_frames(T, tokens_per_frame or 1, W, world_size))
    return Schedule(T, W, n, reference, float(scale), k, auto, rotate, expand, world_size,
                    tuple(sorted(boundary - lead)), tokens_per_frame)
