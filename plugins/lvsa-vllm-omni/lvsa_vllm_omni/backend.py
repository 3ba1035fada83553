"""``LVSABackend`` / ``LVSAAttentionImpl``: vllm-omni's attention backend API over lvsa.

Loaded by vllm-omni through ``DiffusionAttentionBackendEnum.LVSA`` (see
:mod:`lvsa_vllm_omni.compat`). All work happens in
:class:`lvsa_vllm_omni.runtime.LVSAImplCore`, which calls the one lvsa engine of the
model; this module only binds it to vllm-omni's classes and forward context.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
)

from . import runtime
from .runtime import BACKEND_NAME, ForwardInfo, LVSAImplCore


def _read_forward_context() -> ForwardInfo:
    from vllm_omni.diffusion.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return ForwardInfo()
    ctx = get_forward_context()
    return ForwardInfo(ctx, ctx.omni_diffusion_config, ctx.denoise_step_idx)


runtime.read_forward_context = _read_forward_context


class LVSAAttentionImpl(LVSAImplCore, AttentionImpl):
    """Video self-attention through the model's lvsa engine (sparse past the horizon)."""

    def __init__(self, num_heads: int, head_size: int, softmax_scale: float, causal: bool = False,
                 num_kv_heads: int | None = None, prefix: str = "", qkv_layout: str | None = None,
                 backend_kwargs: dict[str, Any] | None = None, **extra_impl_args) -> None:
        from vllm_omni.diffusion.config import get_current_diffusion_config_or_none

        if qkv_layout not in (None, "BSND"):
            raise ValueError(f"the LVSA backend takes [B, S, H, D] tensors (qkv_layout BSND), got {qkv_layout!r}")
        LVSAImplCore.__init__(self, num_heads, head_size, softmax_scale, causal=causal,
                              num_kv_heads=num_kv_heads, prefix=prefix, backend_kwargs=backend_kwargs,
                              od_config=get_current_diffusion_config_or_none(), **extra_impl_args)

    def forward_cuda(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        return self.run(query, key, value, attn_metadata, origin="forward_cuda")

    def forward_npu(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        return self.run(query, key, value, attn_metadata, origin="forward_npu")


class LVSABackend(AttentionBackend):
    """lvsa's rotating-keyframe block-sparse attention for video DiTs (Wan, HunyuanVideo 1.5).

    Runs on CUDA (Triton/FlashInfer backends of ``lvsa-cuda``, ROCm through the CUDA path)
    and Ascend NPUs (``lvsa-ascend``); the torch reference backend everywhere else in
    lvsa is the last fallback. A 2D key mask is honoured exactly (text padding,
    sequence-parallel padding); other masks run dense with a fallback line.
    """

    accept_output_buffer: bool = False
    supported_platforms: tuple[str, ...] | None = ("cuda", "rocm", "npu")

    @classmethod
    def validate_available(cls) -> None:
        import lvsa  # noqa: F401  (the engine; its backends are chosen per call with fallbacks)

    @classmethod
    def supports_attention_mask(cls, attention_spec: object | None = None) -> bool:
        del attention_spec
        return True

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[LVSAAttentionImpl]:
        return LVSAAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[AttentionMetadata]:
        return AttentionMetadata

    @staticmethod
    def get_builder_cls():
        return None

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return []  # every head size: the engine's backends refuse what they cannot run, with a line
