"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): lvsa in ``transformer_blocks[i].attn``.

Replaced: the processor of every dual-stream block's joint attention. The lvsa processor
mirrors diffusers 0.42.1's ``HunyuanVideo15AttnProcessor2_0`` exactly: QKV projections,
per-head ``norm_q``/``norm_k``, RoPE on the video stream, the text stream's
``add_{q,k,v}_proj`` and ``norm_added_{q,k}``, the joint sequence *video then text*, the
text padding mask, ``to_out`` and ``to_add_out``. Attention is split by query:

* video queries → :meth:`lvsa.engine.Engine.attention` over the video keys (sparse by
  frame) plus every *valid* text key (dense), merged exactly;
* text queries → dense over all keys with the original mask (a few hundred rows).

Untouched: the token refiner's text-only attention.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ..ops import append_text
from ..parallel import Gather, Split
from .base import Adapter, Factors, ProcessorBase, cfg_get
from .joint import video_attention_with_text


class HunyuanVideo15LVSAProcessor(ProcessorBase):
    """Joint video+text attention through lvsa (same signature as ``HunyuanVideo15AttnProcessor2_0``)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if encoder_hidden_states is None or attention_mask is None:
            return self.delegate("no_text_stream", hidden_states.shape[1], attn, hidden_states,
                                 encoder_hidden_states, attention_mask, image_rotary_emb)
        cp, handoff = self.context_parallel()
        if handoff:  # diffusers' ring / *_anything context parallelism: the original implements it
            return self.delegate(handoff, hidden_states.shape[1], attn, hidden_states,
                                 encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        # 1. QKV projections and QK norm (video stream)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        # 2. RoPE on the video stream
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 3. text stream
        enc_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        enc_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        enc_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            enc_query = attn.norm_added_q(enc_query)
        if attn.norm_added_k is not None:
            enc_key = attn.norm_added_k(enc_key)

        B, Sq = query.shape[:2]  # video query rows held here (the local shard under context parallelism)
        Lt = enc_query.shape[1]
        text_valid = attention_mask.bool()
        if text_valid.shape[1] != Lt:  # the original left-pads the mask over the joint sequence
            text_valid = text_valid[:, -Lt:]

        # context parallelism: every rank ends up with the WHOLE video K/V (all tokens, its
        # heads for Ulysses / all heads for sequence mode) so that text queries see all of it
        layout, rows = None, None
        if cp is not None:
            self.cp_check(cp, Sq * cp.world_size, lambda: int(text_valid[0].sum()))
            layout = cp.layout(attn.heads)
            if layout == "ulysses":
                qkv = [query, key, value]
                del query, key, value  # handed over: each is released once packed for the exchange
                query, key, value = cp.take_seq_to_heads(qkv)
                enc_query, enc_key, enc_value = (cp.head_slice(t) for t in (enc_query, enc_key, enc_value))
            else:
                key, value = cp.all_gather(key, 1), cp.all_gather(value, 1)
                rows = cp.rows(key.shape[1])
        Sv = key.shape[1]

        # 4a. video queries: lvsa over video keys + valid text keys
        video_out = video_attention_with_text(self.engine, query, key, value, enc_key, enc_value, text_valid,
                                              q_rows=rows)

        # 4b. text queries: dense over every key, with the original mask rows
        all_key, all_value = append_text(key, value, enc_key, enc_value)
        key_valid = F.pad(text_valid, (Sv, 0), value=True)  # [B, Sv+Lt]
        text_mask = (text_valid.view(B, 1, Lt, 1) & key_valid.view(B, 1, 1, Sv + Lt)).bool()
        text_out = dispatch_attention_fn(enc_query, all_key, all_value, attn_mask=text_mask, dropout_p=0.0,
                                         is_causal=False, backend=self._attention_backend)
        del all_key, all_value
        if layout == "ulysses":  # back to the local tokens, all heads (the output handed over)
            box = [video_out.to(query.dtype)]
            del video_out
            video_out = cp.take_heads_to_seq(box)
            text_out = cp.all_gather(text_out.to(query.dtype).contiguous(), 2)

        out = torch.cat([video_out.to(query.dtype), text_out.to(query.dtype)], dim=1)
        out = out.flatten(2, 3).to(query.dtype)

        # 5. output projections
        hidden_states, encoder_hidden_states = out[:, :Sq], out[:, Sq:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanAdapter(Adapter):
    family = "hunyuan"
    fps = 24
    transformer_class = "HunyuanVideo15Transformer3DModel"
    processor_class = HunyuanVideo15LVSAProcessor
    # video tokens split after the patch embedding (RoPE table [S, D] with them), gathered
    # after the output projection; the text stream stays whole on every rank
    cp_plan = (Split("rope", dim=0, output=True),
               Split("transformer_blocks.0", dim=1, arg=0, kwarg="hidden_states"),
               Gather("proj_out", dim=1))

    def factors(self, vae_config, transformer_config) -> Factors:
        p = cfg_get(transformer_config, "patch_size", 1) or 1
        pt = cfg_get(transformer_config, "patch_size_t", 1) or 1
        return Factors(cfg_get(vae_config, "temporal_compression_ratio", 4) or 4,
                       cfg_get(vae_config, "spatial_compression_ratio", 16) or 16, pt, p, p)

    def call_geometry(self, pipe, args: Dict[str, Any]):
        if "image" in args:  # image-to-video: the size comes from the image; read the first forward
            return None
        f = self.pipe_factors(pipe)
        latents = args.get("latents")
        if latents is not None:
            return self.latent_tokens(latents.shape, f)
        height, width = args.get("height"), args.get("width")
        if height is None and width is None:  # mirror HunyuanVideo15Pipeline.__call__
            ar = pipe.default_aspect_ratio
            height, width = pipe.video_processor.calculate_default_height_width(ar[1], ar[0], pipe.target_size)
        lat_h, lat_w = int(height) // f.vae_spatial, int(width) // f.vae_spatial
        T = f.latent_frames(int(args["num_frames"])) // f.patch_t
        return T, (lat_h // f.patch_h) * (lat_w // f.patch_w)

    def decode(self, pipe, latents, num_frames=None):
        vae = pipe.vae
        latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype) / vae.config.scaling_factor
        video = vae.decode(latents, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]


ADAPTER = HunyuanAdapter()
