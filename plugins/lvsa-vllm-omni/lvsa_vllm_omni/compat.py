"""Every place the plugin reaches into vllm-omni beyond its public plugin API.

vllm-omni 0.30 has no registration call for a *new* diffusion attention backend:
``DiffusionAttentionBackendEnum`` is a closed enum and ``register_diffusion_backend``
only overrides existing members. When an upstream registration API exists, this
module is the only one to change.

* :func:`add_backend_member` adds ``LVSA`` to the enum (``aenum.extend_enum``, the
  mechanism vllm-omni itself uses to extend vllm's enums; aenum is its dependency),
  so ``--diffusion-attention-config '{"per_role":{"self":{"backend":"LVSA"}}}'``
  resolves, validates against the platform and loads :class:`LVSABackend`.
* :func:`route_ring_to_dense`: ring sequence parallelism passes K/V blocks around the
  ring inside vllm-omni's ring runner and never calls a backend implementation; the
  runner knows its kernels by name and refuses an explicitly selected backend it does
  not know. For LVSA layers it runs vllm-omni's SDPA ring kernel (dense), and says so
  with ``[LVSA-FALLBACK] origin=ring_attention reason=ring_parallel``.
* :func:`register_pipelines` replaces HunyuanVideo 1.5's pipelines through the public
  ``register_diffusion_model`` with subclasses that publish the latent grid and step.
"""
from __future__ import annotations

import copy

BACKEND_CLASS_PATH = "lvsa_vllm_omni.backend.LVSABackend"


def add_backend_member() -> None:
    """Add ``DiffusionAttentionBackendEnum.LVSA`` (idempotent)."""
    from aenum import extend_enum
    from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum

    if "LVSA" in DiffusionAttentionBackendEnum.__members__:
        member = DiffusionAttentionBackendEnum.__members__["LVSA"]
        if member.value != BACKEND_CLASS_PATH:
            raise RuntimeError(
                f"DiffusionAttentionBackendEnum.LVSA already points to {member.value!r}, "
                f"not {BACKEND_CLASS_PATH!r}: another plugin registered a backend named LVSA")
        return
    extend_enum(DiffusionAttentionBackendEnum, "LVSA", BACKEND_CLASS_PATH)


def route_ring_to_dense() -> None:
    """Make vllm-omni's ring runner run LVSA layers with its SDPA ring kernel (idempotent)."""
    from vllm_omni.diffusion.attention.parallel.ring import RingParallelAttention

    original = RingParallelAttention.run_attention
    if getattr(original, "_lvsa_ring", False):
        return

    def run_attention(self, query, key, value, attn_metadata, softmax_scale=None, causal=False):
        if str(self.attn_backend_pref or "").upper() != "LVSA":
            return original(self, query, key, value, attn_metadata, softmax_scale=softmax_scale, causal=causal)
        from .runtime import ring_fallback

        ring_fallback(int(query.shape[1]))
        dense = copy.copy(self)
        dense.attn_backend_pref = "TORCH_SDPA"
        return original(dense, query, key, value, attn_metadata, softmax_scale=softmax_scale, causal=causal)

    run_attention._lvsa_ring = True
    run_attention.__wrapped__ = original
    RingParallelAttention.run_attention = run_attention


#: vllm-omni architecture -> (our class, the pre/post-process functions it names)
PIPELINES = {
    "HunyuanVideo15Pipeline": "LVSAHunyuanVideo15Pipeline",
    "HunyuanVideo15ImageToVideoPipeline": "LVSAHunyuanVideo15I2VPipeline",
}


def register_pipelines() -> None:
    """Register the HunyuanVideo 1.5 subclasses (same architecture names; idempotent).

    ``register_diffusion_model`` keeps the existing pre/post-process function *names*
    and resolves them in our module, which re-exports vllm-omni's functions.
    """
    from vllm_omni.diffusion.registry import _DIFFUSION_MODELS, register_diffusion_model

    for arch, cls in PIPELINES.items():
        if _DIFFUSION_MODELS.get(arch) == ("lvsa_vllm_omni.hunyuan", "", cls):
            continue
        register_diffusion_model(arch, "lvsa_vllm_omni.hunyuan", cls)
