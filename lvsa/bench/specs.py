"""The models ``lvsa bench model`` builds: public transformer configurations, as data.

Each :class:`ModelSpec` holds the ``transformer/config.json`` of a released diffusers
checkpoint (the keys of the diffusers 0.42 class ``__init__``; values from the public
files named in ``source``), the default resolution, the VAE factors and the text inputs
the pipeline feeds the transformer. ``lvsa bench model`` builds the real diffusers class
from this config with random weights (no download); ``--model DIR`` reads a local
checkpoint's config (and weights) instead.

The ``tiny-*`` specs are the same classes scaled down for ``--quick`` (CPU, seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class ModelSpec:
    """One transformer to benchmark.

    ``text``: what the pipeline passes as text conditioning —
    Wan: ``{"len": 512, "dim": 4096}`` (cross-attention: not in the self-attention sequence);
    HunyuanVideo 1.5: the Qwen2.5-VL stream ``len``/``dim``/``valid`` (valid prompt tokens,
    the rest is padding), the ByT5 stream ``len_2``/``dim_2``/``valid_2`` and the image
    stream ``image_len``/``image_dim`` (zeros in text-to-video); CogVideoX: ``len``/``dim``
    (226 T5 tokens, all attended jointly with the video).
    """

    name: str
    title: str
    family: str              # wan | hunyuan | cogvideox (the lvsa adapter)
    class_name: str          # the diffusers transformer class
    config: Dict[str, Any]
    source: str              # where the config values come from
    height: int
    width: int
    vae_spatial: int
    vae_temporal: int
    reference: int           # training horizon, latent frames
    text: Dict[str, int] = field(default_factory=dict)
    frames: Tuple[int, ...] = ()   # default latent frame counts
    batches: Tuple[int, ...] = (1, 2)
    default_backends: Optional[Tuple[str, ...]] = None  # None: every backend that can run

    @property
    def patch(self) -> Tuple[int, int, int]:
        c = self.config
        if self.family == "wan":
            return tuple(c["patch_size"])
        if self.family == "hunyuan":
            return (c.get("patch_size_t", 1), c["patch_size"], c["patch_size"])
        return (c.get("patch_size_t") or 1, c["patch_size"], c["patch_size"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config["attention_head_dim"])

    @property
    def layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def latent_hw(self) -> Tuple[int, int]:
        return self.height // self.vae_spatial, self.width // self.vae_spatial

    @property
    def tokens_per_frame(self) -> int:
        lh, lw = self.latent_hw
        _, ph, pw = self.patch
        return (lh // ph) * (lw // pw)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def joint_text_tokens(self) -> int:
        """Valid text tokens joined to the video in self-attention (0 for Wan)."""
        if self.family == "hunyuan":
            return self.text.get("valid", 0) + self.text.get("valid_2", 0)
        if self.family == "cogvideox":
            return self.text["len"]
        return 0

    def video_frames(self, T: int) -> int:
        """Video frames for ``T`` latent frames (``(F - 1) / t + 1 = T``)."""
        return (T * self.patch[0] - 1) * self.vae_temporal + 1


WAN_1_3B = dict(
    _class_name="WanTransformer3DModel", added_kv_proj_dim=None, attention_head_dim=128,
    cross_attn_norm=True, eps=1e-06, ffn_dim=8960, freq_dim=256, image_dim=None, in_channels=16,
    num_attention_heads=12, num_layers=30, out_channels=16, patch_size=[1, 2, 2],
    qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096)
WAN_14B = dict(WAN_1_3B, ffn_dim=13824, num_attention_heads=40, num_layers=40)
HUNYUAN_15_480P_T2V = dict(
    _class_name="HunyuanVideo15Transformer3DModel", attention_head_dim=128, image_embed_dim=1152,
    in_channels=65, mlp_ratio=4.0, num_attention_heads=16, num_layers=54, num_refiner_layers=2,
    out_channels=32, patch_size=1, patch_size_t=1, qk_norm="rms_norm", rope_axes_dim=[16, 56, 56],
    rope_theta=256.0, target_size=640, task_type="t2v", text_embed_2_dim=1472, text_embed_dim=3584,
    use_meanflow=False)
COGVIDEOX_5B = dict(
    _class_name="CogVideoXTransformer3DModel", activation_fn="gelu-approximate", attention_bias=True,
    attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True, freq_shift=0, in_channels=16,
    max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-05, num_attention_heads=48,
    num_layers=42, out_channels=16, patch_size=2, sample_frames=49, sample_height=60, sample_width=90,
    spatial_interpolation_scale=1.875, temporal_compression_ratio=4, temporal_interpolation_scale=1.0,
    text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
    use_learned_positional_embeddings=False, use_rotary_positional_embeddings=True)

_HY_TEXT = dict(len=1000, dim=3584, valid=256, len_2=256, dim_2=1472, valid_2=0, image_len=729, image_dim=1152)

SPECS: Dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("wan2.1-1.3b", "Wan 2.1 T2V 1.3B", "wan", "WanTransformer3DModel", WAN_1_3B,
              "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json", 480, 832, 8, 4, 21,
              dict(len=512, dim=4096), frames=(21, 81, 121)),
    ModelSpec("wan2.1-14b", "Wan 2.1 T2V 14B", "wan", "WanTransformer3DModel", WAN_14B,
              "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json", 480, 832, 8, 4, 21,
              dict(len=512, dim=4096), frames=(81,), batches=(1,)),
    ModelSpec("hunyuanvideo-1.5", "HunyuanVideo 1.5 480p T2V", "hunyuan", "HunyuanVideo15Transformer3DModel",
              HUNYUAN_15_480P_T2V, "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v "
              "transformer/config.json", 480, 832, 16, 4, 33, _HY_TEXT, frames=(33, 65), batches=(1,)),
    ModelSpec("cogvideox-5b", "CogVideoX 5B", "cogvideox", "CogVideoXTransformer3DModel", COGVIDEOX_5B,
              "THUDM/CogVideoX-5b transformer/config.json", 480, 720, 8, 4, 13, dict(len=226, dim=4096),
              frames=(13, 51), batches=(1,)),
    # --quick: the same classes, a few layers and heads, tiny frames (CPU, seconds)
    ModelSpec("tiny-wan", "tiny Wan (quick)", "wan", "WanTransformer3DModel",
              dict(WAN_1_3B, attention_head_dim=16, ffn_dim=64, num_attention_heads=2, num_layers=2,
                   text_dim=32), "WAN_1_3B scaled down", 64, 64, 8, 4, 21, dict(len=16, dim=32),
              frames=(21, 41)),
    ModelSpec("tiny-hunyuan", "tiny HunyuanVideo 1.5 (quick)", "hunyuan", "HunyuanVideo15Transformer3DModel",
              dict(HUNYUAN_15_480P_T2V, attention_head_dim=16, num_attention_heads=2, num_layers=2,
                   num_refiner_layers=1, mlp_ratio=2.0, rope_axes_dim=[4, 6, 6], text_embed_dim=32,
                   text_embed_2_dim=16, image_embed_dim=16, in_channels=9, out_channels=4),
              "HUNYUAN_15_480P_T2V scaled down", 64, 64, 16, 4, 33,
              dict(len=24, dim=32, valid=8, len_2=8, dim_2=16, valid_2=0, image_len=4, image_dim=16),
              frames=(49,), batches=(1,)),
    ModelSpec("tiny-cogvideox", "tiny CogVideoX (quick)", "cogvideox", "CogVideoXTransformer3DModel",
              dict(COGVIDEOX_5B, attention_head_dim=16, num_attention_heads=2, num_layers=2, text_embed_dim=32,
                   time_embed_dim=16, max_text_seq_length=8, sample_height=8, sample_width=8),
              "COGVIDEOX_5B scaled down", 64, 64, 8, 4, 13, dict(len=8, dim=32), frames=(25,),
              batches=(1,)),
]}
ALIASES = {"wan": "wan2.1-1.3b", "wan1.3b": "wan2.1-1.3b", "wan14b": "wan2.1-14b", "wan2.1-t2v-1.3b": "wan2.1-1.3b",
           "wan2.1-t2v-14b": "wan2.1-14b", "hunyuan": "hunyuanvideo-1.5", "hy": "hunyuanvideo-1.5",
           "hunyuanvideo": "hunyuanvideo-1.5", "cogvideox": "cogvideox-5b", "cog": "cogvideox-5b"}
QUICK = ("tiny-wan", "tiny-hunyuan", "tiny-cogvideox")
FULL = ("wan2.1-1.3b", "wan2.1-14b", "hunyuanvideo-1.5", "cogvideox-5b")


def get_spec(name: str) -> ModelSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SPECS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SPECS)} (aliases: {', '.join(sorted(ALIASES))}); "
                         "or pass --model-dir DIR for a local diffusers checkpoint")
    return SPECS[key]


_FAMILY_OF_CLASS = {"WanTransformer3DModel": "wan", "HunyuanVideo15Transformer3DModel": "hunyuan",
                    "CogVideoXTransformer3DModel": "cogvideox"}


def spec_from_dir(path: str, height: Optional[int] = None, width: Optional[int] = None) -> Tuple[ModelSpec, str]:
    """A spec from a local diffusers checkpoint: a pipeline directory (``transformer/``
    inside) or a transformer directory. Returns ``(spec, transformer_dir)``."""
    import json
    import os

    cands = [os.path.join(path, "transformer"), path]
    tdir = next((d for d in cands if os.path.isfile(os.path.join(d, "config.json"))), None)
    if tdir is None:
        raise ValueError(f"--model-dir {path}: no config.json in it or in its transformer/ folder "
                         "(expected a diffusers checkpoint directory)")
    with open(os.path.join(tdir, "config.json")) as fh:
        cfg = json.load(fh)
    cls = cfg.get("_class_name")
    if cls not in _FAMILY_OF_CLASS:
        raise ValueError(f"--model-dir {path}: transformer class {cls!r} is not one lvsa benchmarks; "
                         f"supported: {', '.join(_FAMILY_OF_CLASS)}")
    family = _FAMILY_OF_CLASS[cls]
    base = {"wan": SPECS["wan2.1-1.3b"], "hunyuan": SPECS["hunyuanvideo-1.5"], "cogvideox": SPECS["cogvideox-5b"]}[family]
    vae_spatial, vae_temporal = base.vae_spatial, base.vae_temporal
    vae_cfg = os.path.join(path, "vae", "config.json")
    if os.path.isfile(vae_cfg):
        with open(vae_cfg) as fh:
            v = json.load(fh)
        vae_spatial = int(v.get("scale_factor_spatial") or v.get("spatial_compression_ratio")
                          or (2 ** (len(v["block_out_channels"]) - 1) if v.get("block_out_channels") else vae_spatial))
        vae_temporal = int(v.get("scale_factor_temporal") or v.get("temporal_compression_ratio") or vae_temporal)
    text = dict(base.text)
    if family == "wan":
        text["dim"] = cfg.get("text_dim", text["dim"])
    elif family == "hunyuan":
        text.update(dim=cfg.get("text_embed_dim", text["dim"]), dim_2=cfg.get("text_embed_2_dim", text["dim_2"]),
                    image_dim=cfg.get("image_embed_dim", text["image_dim"]))
    else:
        text.update(len=cfg.get("max_text_seq_length", text["len"]), dim=cfg.get("text_embed_dim", text["dim"]))
    name = os.path.basename(os.path.normpath(path))
    from dataclasses import replace

    spec = replace(base, name=name, title=f"{name} ({cls})", config={k: v for k, v in cfg.items()
                                                                       if not k.startswith("_")},
                   source=os.path.join(tdir, "config.json"), height=height or base.height,
                   width=width or base.width, vae_spatial=vae_spatial, vae_temporal=vae_temporal, text=text)
    return spec, tdir
