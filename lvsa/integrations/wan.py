"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): lvsa in ``blocks[i].attn1``.

Replaced: the processor of every *self*-attention (``attn1``, a ``WanAttention`` with
``is_cross_attention=False``). The lvsa processor mirrors diffusers 0.42.1's
``WanAttnProcessor`` for that case exactly (fused or separate QKV projections,
``norm_q``/``norm_k`` RMSNorm across heads, Wan's interleaved RoPE, ``to_out``); only the
attention itself goes through :meth:`lvsa.engine.Engine.attention`. The sequence is
video-only (Wan has no text tokens in self-attention).

Untouched: cross-attention (``attn2``), where the text and, for image-to-video, the image
context (``add_k_proj``/``add_v_proj``) arrive.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..parallel import Gather, Split
from ..presets import FAMILY_REFERENCE, PRESETS, WAN_TI2V
from .base import Adapter, Factors, ProcessorBase, cfg_get


def _apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    # identical to the closure in diffusers' WanAttnProcessor.__call__
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanLVSAProcessor(ProcessorBase):
    """Self-attention of a ``WanAttention`` through lvsa (same signature as ``WanAttnProcessor``)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            reason = "attention_mask" if attention_mask is not None else "cross_attention"
            return self.delegate(reason, hidden_states.shape[1], attn, hidden_states, encoder_hidden_states,
                                 attention_mask, rotary_emb)
        cp, handoff = self.context_parallel()
        if handoff:  # diffusers' ring / *_anything context parallelism: the original implements it
            return self.delegate(handoff, hidden_states.shape[1], attn, hidden_states, None, None, rotary_emb)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        dtype = query.dtype
        if cp is not None:  # local shards [B, S/w, H, D]: exact attention over the whole sequence
            qkv = [query, key, value]
            del query, key, value  # handed over: each is released once packed for the exchange
            out = self.cp_video_attention(cp, qkv)
        else:
            out = self.engine.attention(query, key, value)
        out = out.flatten(2, 3).to(dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


class WanAdapter(Adapter):
    family = "wan"
    fps = 16
    processor_class = WanLVSAProcessor
    # the sequence is split after patch embedding and gathered after the output
    # projection (as diffusers' own Wan _cp_plan): RoPE tables and the per-token timestep
    # of Wan 2.2 TI2V are split with it; cross-attention needs nothing (text is replicated)
    cp_plan = (Split("rope", dim=1, output=True),
               Split("", dim=1, arg=1, kwarg="timestep", only_ndim=2),
               Split("blocks.0", dim=1, arg=0, kwarg="hidden_states"),
               Gather("proj_out", dim=1))

    def matches(self, transformer) -> bool:
        from diffusers.models.transformers.transformer_wan import WanAttention

        return type(transformer).__name__.startswith("Wan") and any(
            isinstance(m, WanAttention) for m in transformer.modules())

    def attention_modules(self, transformer):
        from diffusers.models.transformers.transformer_wan import WanAttention

        return [(n, m) for n, m in transformer.named_modules()
                if isinstance(m, WanAttention) and not m.is_cross_attention]

    def factors(self, vae_config, transformer_config) -> Factors:
        p = tuple(cfg_get(transformer_config, "patch_size", (1, 2, 2)))
        return Factors(cfg_get(vae_config, "scale_factor_temporal", 4) or 4,
                       cfg_get(vae_config, "scale_factor_spatial", 8) or 8, p[0], p[1], p[2])

    def known_reference(self, pipe) -> int:
        # Wan 2.2 TI2V-5B (expand_timesteps) has its own horizon; the others the family's.
        cfg = getattr(pipe, "config", None)
        if cfg_get(cfg, "expand_timesteps", False):
            return PRESETS[WAN_TI2V].reference_latent_frames
        return FAMILY_REFERENCE["wan"]

    def call_geometry(self, pipe, args: Dict[str, Any]):
        f = self.pipe_factors(pipe)
        latents = args.get("latents")
        if latents is not None:
            return self.latent_tokens(latents.shape, f)
        # mirror WanPipeline.__call__'s rounding of num_frames, height and width
        num_frames = int(args["num_frames"])
        if num_frames % f.vae_temporal != 1:
            num_frames = num_frames // f.vae_temporal * f.vae_temporal + 1
        num_frames = max(num_frames, 1)
        mh, mw = f.spatial_multiple
        height = int(args["height"]) // mh * mh
        width = int(args["width"]) // mw * mw
        return f.latent_frames(num_frames) // f.patch_t, f.patches_per_frame(height, width)

    def decode(self, pipe, latents, num_frames=None):
        vae = pipe.vae
        latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]


ADAPTER = WanAdapter()
