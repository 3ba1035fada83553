"""CogVideoX (``CogVideoXTransformer3DModel``): lvsa in ``transformer_blocks[i].attn1``.

Replaced: the processor of every block's joint attention (``CogVideoXAttnProcessor2_0``
or its fused twin). The lvsa processor mirrors diffusers 0.42.1 exactly: the joint
sequence *text then video*, QKV projections (fused or not), per-head LayerNorm
``norm_q``/``norm_k``, RoPE on the video part only (CogVideoX 1.0 5B / 1.5), one
``to_out`` over the joint sequence, then the split back. Attention is split by query:

* video queries → :meth:`lvsa.engine.Engine.attention` over the video keys (sparse by
  frame) plus every text key (dense), merged exactly;
* text queries (226 rows) → dense SDPA over all keys, as before.

A call with an explicit ``attention_mask`` (no CogVideoX pipeline passes one) is handed
to the original processor with a fallback line.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..parallel import Gather, Split
from .base import Adapter, Factors, ProcessorBase, cfg_get, transformers_of


class CogVideoXLVSAProcessor(ProcessorBase):
    """Joint text+video attention through lvsa (same signature as ``CogVideoXAttnProcessor2_0``)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if attention_mask is not None:
            return self.delegate("attention_mask", hidden_states.shape[1] + encoder_hidden_states.shape[1],
                                 attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cp, handoff = self.context_parallel()
        if handoff:  # diffusers' ring / *_anything context parallelism: the original implements it
            return self.delegate(handoff, hidden_states.shape[1] + encoder_hidden_states.shape[1],
                                 attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        # video queries through lvsa ([B, S, H, D] layout), text keys dense
        t = text_seq_length
        if cp is None:
            video_out = self.engine.attention(
                query[:, :, t:].transpose(1, 2), key[:, :, t:].transpose(1, 2), value[:, :, t:].transpose(1, 2),
                text_k=key[:, :, :t].transpose(1, 2), text_v=value[:, :, :t].transpose(1, 2))
            # text queries: dense over all keys, exactly as the original
            text_out = F.scaled_dot_product_attention(query[:, :, :t], key, value, dropout_p=0.0, is_causal=False)
        else:
            text_out, video_out = self._cp_attention(cp, query, key, value, t)

        out = torch.cat([text_out.transpose(1, 2), video_out.to(text_out.dtype)], dim=1)
        out = out.reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_hidden_states, hidden_states = out.split([t, out.size(1) - t], dim=1)
        return hidden_states, encoder_hidden_states


    def _cp_attention(self, cp, query, key, value, t):
        """Context parallelism: ``query``/``key``/``value`` ``[B, H, t + S/w, D]`` hold the
        replicated text then this rank's video tokens. Returns ``(text_out [B, H, t, D],
        video_out [B, S/w, H, D])``, exactly the single-device values."""
        qv, kv, vv = (x[:, :, t:].transpose(1, 2) for x in (query, key, value))  # [B, S/w, H, D]
        self.cp_check(cp, qv.shape[1] * cp.world_size, t)
        if cp.layout(query.shape[1]) == "ulysses":
            qv, kv, vv = cp.seq_to_heads_many(qv, kv, vv)  # [B, S, H/w, D]
            tq, tk, tv = (cp.head_slice(x, 1) for x in (query[:, :, :t], key[:, :, :t], value[:, :, :t]))
            video_out = self.engine.attention(qv, kv, vv, text_k=tk.transpose(1, 2), text_v=tv.transpose(1, 2))
            text_out = F.scaled_dot_product_attention(
                tq, torch.cat([tk, kv.transpose(1, 2)], dim=2), torch.cat([tv, vv.transpose(1, 2)], dim=2),
                dropout_p=0.0, is_causal=False)  # [B, H/w, t, D], keys in the original order
            video_out = cp.heads_to_seq(video_out.to(qv.dtype))
            text_out = cp.all_gather(text_out.contiguous(), 1)
            return text_out, video_out
        kv, vv = cp.all_gather(kv, 1), cp.all_gather(vv, 1)  # sequence mode: all video K/V, all heads
        tk, tv = key[:, :, :t], value[:, :, :t]
        video_out = self.engine.attention(qv, kv, vv, text_k=tk.transpose(1, 2), text_v=tv.transpose(1, 2),
                                          q_rows=cp.rows(kv.shape[1]))
        text_out = F.scaled_dot_product_attention(
            query[:, :, :t], torch.cat([tk, kv.transpose(1, 2)], dim=2), torch.cat([tv, vv.transpose(1, 2)], dim=2),
            dropout_p=0.0, is_causal=False)
        return text_out, video_out


class CogVideoXAdapter(Adapter):
    family = "cogvideox"
    fps = 8
    transformer_class = "CogVideoXTransformer3DModel"
    attn_attr = "attn1"
    processor_class = CogVideoXLVSAProcessor
    # the pipeline passes the RoPE tables ([S, D]) to the transformer; the video tokens are
    # split after the joint patch embedding, gathered after the output projection
    cp_plan = (Split("", dim=0, arg=5, kwarg="image_rotary_emb"),
               Split("transformer_blocks.0", dim=1, arg=0, kwarg="hidden_states"),
               Gather("proj_out", dim=1))

    def factors(self, vae_config, transformer_config) -> Factors:
        boc = cfg_get(vae_config, "block_out_channels", None)
        vs = 2 ** (len(boc) - 1) if boc else 8
        p = cfg_get(transformer_config, "patch_size", 2) or 2
        pt = cfg_get(transformer_config, "patch_size_t", None) or 1
        return Factors(int(cfg_get(vae_config, "temporal_compression_ratio", 4) or 4), vs, pt, p, p)

    def _tokens_T(self, f: Factors, num_frames: int) -> int:
        lat = f.latent_frames(num_frames)
        if f.patch_t > 1 and lat % f.patch_t:  # CogVideoX 1.5 pads to a multiple of patch_size_t
            lat += f.patch_t - lat % f.patch_t
        return lat // f.patch_t

    def latent_tokens(self, shape, factors: Factors):
        # CogVideoX latents are [B, F, C, H, W]
        return shape[1] // factors.patch_t, (shape[-2] // factors.patch_h) * (shape[-1] // factors.patch_w)

    def known_reference(self, pipe) -> int:
        tr = transformers_of(pipe)[0]
        frames = cfg_get(tr.config, "sample_frames", None)
        if not frames:
            return super().known_reference(pipe)
        return self._tokens_T(self.factors(getattr(getattr(pipe, "vae", None), "config", None), tr.config), frames)

    def call_geometry(self, pipe, args: Dict[str, Any]):
        if "image" in args or "video" in args:
            return None
        f = self.pipe_factors(pipe)
        latents = args.get("latents")
        if latents is not None:
            return self.latent_tokens(latents.shape, f)
        cfg = pipe.transformer.config
        height = args.get("height") or cfg.sample_height * pipe.vae_scale_factor_spatial
        width = args.get("width") or cfg.sample_width * pipe.vae_scale_factor_spatial
        num_frames = args.get("num_frames") or cfg.sample_frames
        return self._tokens_T(f, num_frames), f.patches_per_frame(height, width)

    def decode(self, pipe, latents, num_frames=None):
        if num_frames:
            # CogVideoX 1.5 (patch_size_t > 1) pads the latent in front to a multiple of
            # patch_size_t and drops the padding only when it decodes itself: do the same
            # (the VAE's temporal factor only: `lvsa decode` loads no transformer)
            extra = latents.shape[1] - self.factors(pipe.vae.config, None).latent_frames(num_frames)
            if extra > 0:
                latents = latents[:, extra:]
        latents = latents.to(device=next(pipe.vae.parameters()).device, dtype=pipe.vae.dtype)
        video = pipe.decode_latents(latents)
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]


ADAPTER = CogVideoXAdapter()
