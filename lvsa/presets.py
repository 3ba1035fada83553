"""Model presets: the one table every family default is derived from.

:data:`PRESETS` lists what lvsa knows about each supported checkpoint;
:data:`FAMILY_DEFAULT` names the preset that stands for an adapter family, and
:data:`FAMILY_REFERENCE` (the ``LVSA_REFERENCE_LATENT_FRAMES`` default per family) is
derived from it. Change a number here and every default follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .geometry import latent_frames, patches_per_frame


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
#: the preset that stands for each adapter family (its defaults are the family's)
FAMILY_DEFAULT: Dict[str, str] = {"wan": ALIASES["wan"], "hunyuan": ALIASES["hunyuan"],
                                  "cogvideox": ALIASES["cogvideox"]}
#: Wan 2.2 TI2V-5B (the ``expand_timesteps`` Wan transformer) has its own horizon
WAN_TI2V = "wan2.2-ti2v-5b"
#: Training horizons by adapter family (the LVSA_REFERENCE_LATENT_FRAMES defaults).
FAMILY_REFERENCE: Dict[str, int] = {fam: PRESETS[name].reference_latent_frames
                                    for fam, name in FAMILY_DEFAULT.items()}


def get_preset(name: str) -> ModelPreset:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))} "
            f"(aliases: {', '.join(sorted(ALIASES))})")
    return PRESETS[key]


def family_preset(family: str) -> ModelPreset:
    """The preset standing for an adapter family (``wan`` → Wan 2.1 T2V 1.3B)."""
    if family not in FAMILY_DEFAULT:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_DEFAULT)}")
    return PRESETS[FAMILY_DEFAULT[family]]
