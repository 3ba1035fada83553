"""Tiny offline pipelines of the three supported families, for demos and tests.

Every component is built from a config with random weights (fixed seed, so two builds
are identical) and a byte-level tokenizer (``ByT5Tokenizer``: no files, no download).
They run in well under a second per step on a CPU and make **noise**, not video: they
exist to exercise lvsa end to end (geometry, schedule, sparse path, decode, mp4).

>>> from lvsa.tiny import build
>>> pipe = build("wan")                       # a diffusers WanPipeline      # doctest: +SKIP
>>> pipe("a cat", **TINY_DEFAULTS["wan"])     # 97 frames → 25 latent frames # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

FAMILIES = ("wan", "hunyuan", "cogvideox")

# Call defaults of the built-in tiny models. The frame counts lie past each family's
# training horizon (Wan 21, HunyuanVideo 1.5 33, CogVideoX 13 latent frames), so lvsa
# runs SPARSE on them with no extra setting.
TINY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "wan": dict(num_frames=97, height=64, width=64, num_inference_steps=8),
    "hunyuan": dict(num_frames=145, height=64, width=64, num_inference_steps=4),
    "cogvideox": dict(num_frames=65, height=64, width=64, num_inference_steps=8),
}

# Minimal chat template for the Qwen2.5-VL slot of HunyuanVideo 1.5 (the pipeline calls
# ``tokenizer.apply_chat_template``).
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _byt5():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny_wan(seed: int = 0):
    """A ``WanPipeline``: 2 blocks, 2 heads of 12, tiny Wan VAE (×4 time, ×8 space), UMT5 text encoder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
    return WanPipeline(tokenizer=_byt5(), text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)


def tiny_hunyuan(seed: int = 0):
    """A ``HunyuanVideo15Pipeline``: 2 blocks, 2 heads of 8, tiny VAE (×4 time, ×16 space),
    tiny Qwen2.5-VL and ByT5 text encoders; text lengths shortened for speed."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _byt5()
    tokenizer.chat_template = _CHAT_TEMPLATE
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]}))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                             num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=16, temporal_compression_ratio=4)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=64, task_type="t2v")
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=_byt5(), guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.tokenizer_max_length = 32
    pipe.tokenizer_2_max_length = 16
    pipe.vision_num_semantic_tokens = 4
    return pipe


def tiny_cogvideox(seed: int = 0, patch_size_t=None):
    """A ``CogVideoXPipeline`` with RoPE (5B-style): 2 blocks, 2 heads of 16, tiny VAE (×4, ×8), T5.
    ``patch_size_t=2`` makes it CogVideoX 1.5-style (temporal patches, padded latents)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=4, relative_attention_num_buckets=8))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=49, patch_size=2,
        patch_size_t=patch_size_t, patch_bias=patch_size_t is None,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=_byt5(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


BUILDERS: Dict[str, Callable[..., Any]] = {"wan": tiny_wan, "hunyuan": tiny_hunyuan, "cogvideox": tiny_cogvideox}

# Extra call arguments the tiny pipelines need to stay tiny (short text sequences).
TINY_CALL_KWARGS: Dict[str, Dict[str, Any]] = {
    "wan": dict(max_sequence_length=32),
    "hunyuan": {},
    "cogvideox": dict(max_sequence_length=16),
}


def build(family: str, seed: int = 0, **options):
    """The tiny pipeline of ``family`` (``wan`` | ``hunyuan`` | ``cogvideox``), eval mode."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny model {family!r}; choose from {', '.join(FAMILIES)}")
    pipe = BUILDERS[family](seed, **options)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.eval()
    return pipe


def call_kwargs(family: str, **overrides) -> Dict[str, Any]:
    """Call arguments of the tiny ``family`` pipeline: its defaults, updated with ``overrides``."""
    kw = dict(TINY_DEFAULTS[family])
    kw.update(TINY_CALL_KWARGS[family])
    kw.update(overrides)
    return kw


def run_latent(pipe, family: str, seed: int = 0, prompt: str = "a red fox running through snow", **overrides):
    """Run a tiny pipeline to its denoised latent (deterministic for a seed)."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
               **call_kwargs(family, **overrides))
    return out.frames


def compare_with_lvsa(pipe, family: str, settings: Optional[Dict[str, Any]] = None, **overrides):
    """Run ``pipe`` unmodified, then under ``lvsa.enable(pipe, **settings)`` with every event recorded.

    Returns ``(unmodified latent, lvsa latent, EventRecorder, engine summary)``; lvsa stays
    enabled on ``pipe`` afterwards.
    """
    from . import integrations

    integrations.disable(pipe)
    base = run_latent(pipe, family, **overrides)
    integrations.enable(pipe, **(settings or {}))
    with EventRecorder() as rec:
        out = run_latent(pipe, family, **overrides)
    return base, out, rec, integrations.last_summary(pipe)


class EventRecorder:
    """An lvsa plugin that keeps every telemetry event (tests, notebooks).

    >>> with EventRecorder() as rec:          # doctest: +SKIP
    ...     pipe(...)
    >>> [e["reason"] for e in rec.of("fallback")]
    """

    def __init__(self):
        self.events = []

    from .hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def lvsa_event(self, event):
        self.events.append(event)

    def of(self, kind: str):
        return [e for e in self.events if e.kind == kind]

    def __enter__(self):
        from .plugins import register_plugin

        register_plugin(self, name=f"lvsa.recorder.{id(self)}")
        return self

    def __exit__(self, *exc):
        from .plugins import unregister_plugin

        unregister_plugin(self)
        return False
