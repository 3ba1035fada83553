"""Which geometry fits a logged sequence length: the arithmetic behind ``reason=geometry_detect``.

lvsa finds ``(T, P)`` from a self-attention sequence of ``seq_len`` tokens as
``T * P + text == seq_len`` for a known ``P`` (tokens per latent frame). When none fits it
falls back to dense and logs ``seq_len`` and the ``known_ppf`` it tried. This module
searches the other direction: for the model presets (their VAE spatial factor and patch
size, their text tokens) and the resolutions people run, which ``P`` (and ``T``) make
``seq_len`` whole, and so which ``LVSA_PATCHES_PER_FRAME`` or ``LVSA_VIDEO_HEIGHT``/
``LVSA_VIDEO_WIDTH`` to set. It also tests the sequence-parallel case, where the
sequence reaching the backend is ``1/k`` of the video (Wan's ``_sp_plan`` pre-shards it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from ..presets import PRESETS

#: resolutions (height, width) people generate at, most common first (both orientations)
COMMON_RESOLUTIONS: Tuple[Tuple[int, int], ...] = (
    (480, 832), (832, 480), (720, 1280), (1280, 720), (704, 1280), (1280, 704), (480, 848), (848, 480),
    (544, 960), (960, 544), (480, 720), (720, 480), (576, 1024), (1024, 576), (512, 512), (768, 768),
    (624, 624), (768, 1360), (1360, 768), (1088, 1920), (1920, 1088), (240, 416), (416, 240), (256, 256),
    (320, 512), (512, 320), (360, 640), (640, 360),
)
#: sequence-parallel degrees tried when the sequence may be a shard
SHARD_DEGREES = (2, 4, 8)
MAX_LATENT_FRAMES = 1024
MAX_TEXT_TOKENS = 1280  # HunyuanVideo 1.5: valid prompt tokens of both encoders stay below this


@dataclass(frozen=True)
class Fit:
    """One geometry that makes ``seq_len`` whole."""

    T: int
    P: int
    text: int
    shard: int = 1                           # sequence-parallel degree (1: the whole sequence)
    height: Optional[int] = None
    width: Optional[int] = None
    vae_spatial: Optional[int] = None
    patch: Optional[int] = None
    source: str = ""                         # why this P: known_ppf, log, preset resolution, ...

    @property
    def num_frames(self) -> int:
        return (self.T - 1) * 4 + 1

    def describe(self) -> str:
        s = f"T={self.T} latent frames ({self.num_frames} video frames) x P={self.P}"
        if self.height:
            s += f" ({self.height}x{self.width}, VAE spatial {self.vae_spatial}, patch {self.patch})"
        if self.text:
            s += f" + {self.text} text tokens"
        if self.shard > 1:
            s += f" = {self.T * self.P + self.text} tokens, split over {self.shard} sequence-parallel ranks"
        return s + f" [{self.source}]"

    def env(self) -> List[str]:
        """The variables that make lvsa find this geometry."""
        return [f"LVSA_PATCHES_PER_FRAME={self.P}"]

    def resolution_env(self) -> List[str]:
        if not self.height:
            return []
        out = [f"LVSA_VIDEO_HEIGHT={self.height}", f"LVSA_VIDEO_WIDTH={self.width}"]
        if (self.vae_spatial, self.patch) != (8, 2):  # the config defaults
            out += [f"LVSA_VAE_SPATIAL_FACTOR={self.vae_spatial}", f"LVSA_PATCH_SIZE={self.patch}"]
        return out


def _units(family: Optional[str]) -> List[Tuple[int, int]]:
    """(VAE spatial factor, patch size) pairs of the presets (of ``family`` when known)."""
    seen: List[Tuple[int, int]] = []
    for p in PRESETS.values():
        if family and p.family != family:
            continue
        u = (p.vae_spatial_factor, p.patch_size)
        if u not in seen:
            seen.append(u)
    return seen or [(8, 2)]


def text_candidates(family: Optional[str], seen: Iterable[int] = ()) -> List[int]:
    """Fixed text lengths joined to the sequence: 0 (Wan), the presets' (CogVideoX 226), those seen."""
    out: List[int] = []
    for t in list(seen) + [0] + [p.text_tokens for p in PRESETS.values() if not family or p.family == family]:
        if t >= 0 and t not in out:
            out.append(t)
    return out


def _ok_T(T: int) -> bool:
    return 1 <= T <= MAX_LATENT_FRAMES


def _variable_text(family: Optional[str]) -> bool:
    # HunyuanVideo 1.5 joins the prompt's valid tokens: their count changes with the prompt
    return family == "hunyuan"


def fits(seq_len: int, known_ppf: Sequence[int] = (), family: Optional[str] = None,
         texts_seen: Iterable[int] = (), P_seen: Iterable = (), expected_T: Optional[int] = None,
         sharded_possible: bool = True, limit: int = 5) -> List[Fit]:
    """Geometries that explain ``seq_len``, best first.

    ``P_seen``: ``P`` values or ``(T, P)`` pairs the log itself reports (``lvsa generate``'s
    summary, engaged lines). Order: those, the ``T`` lvsa expected,
    the configured ``known_ppf`` on a sharded sequence (the ``P`` was right, the sequence
    was split), then the presets' VAE/patch factors at common resolutions.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        return []  # a line with an elided or garbled seq_len: nothing to compute
    texts = text_candidates(family, texts_seen)
    out: List[Fit] = []

    def add(f: Fit):
        if all((f.T, f.P, f.text, f.shard) != (g.T, g.P, g.text, g.shard) for g in out):
            out.append(f)

    def whole(P: int, shard: int = 1, source: str = "", **res):
        total = seq_len * shard
        for text in texts:
            video = total - text
            if video > 0 and video % P == 0 and _ok_T(video // P):
                add(Fit(video // P, P, text, shard, source=source, **res))
                return
        if _variable_text(family) and shard == 1 and P >= MAX_TEXT_TOKENS:
            T, text = divmod(total, P)
            if _ok_T(T) and 0 < text <= MAX_TEXT_TOKENS:
                add(Fit(T, P, text, shard, source=source + ", prompt tokens", **res))

    for seen in P_seen:
        T_seen, P = seen if isinstance(seen, tuple) else (None, seen)
        if T_seen and 0 <= seq_len - T_seen * P <= MAX_TEXT_TOKENS:
            add(Fit(T_seen, P, seq_len - T_seen * P, source="T and P reported in the log"))
        else:
            whole(P, source="P reported in the log")
    if expected_T:
        for text in texts:
            video = seq_len - text
            if video > 0 and video % expected_T == 0:
                add(Fit(expected_T, video // expected_T, text, source="the T lvsa expected"))
                break
    if sharded_possible:
        for P in known_ppf:
            for k in SHARD_DEGREES:  # the smallest degree that fits (a larger one then fits trivially)
                n = len(out)
                whole(P, shard=k, source=f"known_ppf {P}, sequence split {k} ways")
                if len(out) > n:
                    break
    for h, w in COMMON_RESOLUTIONS:
        for vs, ps in _units(family):
            u = vs * ps
            if h % u or w % u:
                continue
            P = (h // u) * (w // u)
            if P in known_ppf:
                continue  # lvsa already tried it on the whole sequence
            whole(P, source="common resolution", height=h, width=w, vae_spatial=vs, patch=ps)
    return out[:limit]


def divisor_grids(seq_len: int, limit: int = 3) -> List[Tuple[int, int]]:
    """``(T, P)`` splits of a video-only ``seq_len`` whose ``P`` is a near-rectangular grid, for
    when no common resolution fits (the user must check them against their resolution)."""
    out: List[Tuple[int, int]] = []
    if not isinstance(seq_len, int) or seq_len <= 0:
        return out
    for T in range(2, min(seq_len, MAX_LATENT_FRAMES) + 1):
        if seq_len % T:
            continue
        P = seq_len // T
        for a in range(int(P ** 0.5), 0, -1):
            if P % a == 0:
                if (P // a) <= 4 * a and P >= 16:
                    out.append((T, P))
                break
        if len(out) >= limit:
            break
    return out
