"""HunyuanVideo 1.5 pipelines that tell lvsa the latent grid and the denoising step.

vllm-omni's HunyuanVideo 1.5 transformer publishes no ``video_layout`` and its
pipelines set no ``denoise_step_idx``. These subclasses (registered under the same
architecture names with ``register_diffusion_model``) publish both once per step,
before the transformer runs, on every CFG branch and rank:

* the step: the index of the pipeline's current timestep in its scheduler's timesteps,
  set as the forward context's ``denoise_step_idx`` (vllm-omni's own field);
* the latent grid ``(t, h, w)`` after patching, from the transformer input's shape and
  the transformer's patch sizes, for the running forward context.

They are inert (exactly the parent pipeline) unless the per-role attention config
selects LVSA for the transformer's self-attention role.
"""
from __future__ import annotations

from typing import Any

from vllm_omni.diffusion.forward_context import (
    get_forward_context,
    is_forward_context_available,
    set_forward_context_denoise_step_idx,
    set_forward_context_denoise_total_steps,
)
from vllm_omni.diffusion.models.hunyuan_video.pipeline_hunyuan_video_1_5 import (  # noqa: F401 (re-exported)
    HunyuanVideo15Pipeline,
    get_hunyuan_video_15_post_process_func,
)
from vllm_omni.diffusion.models.hunyuan_video.pipeline_hunyuan_video_1_5_i2v import (  # noqa: F401
    HunyuanVideo15I2VPipeline,
    get_hunyuan_video_15_i2v_post_process_func,
    get_hunyuan_video_15_i2v_pre_process_func,
)

from .runtime import BACKEND_NAME, runtime_for


def lvsa_selected(od_config, role: str = "self") -> bool:
    """Whether the per-role attention config selects LVSA for ``role``."""
    cfg = getattr(od_config, "diffusion_attention_config", None)
    if cfg is None:
        return False
    spec, _ = cfg.resolve_with_source(role=role)
    return spec is not None and spec.backend.upper() == BACKEND_NAME


def step_index(timesteps, t) -> int | None:
    """Index of timestep ``t`` in the scheduler's ``timesteps`` (strictly decreasing)."""
    if timesteps is None or t is None:
        return None
    hits = (timesteps == t).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


class _PublishesToLVSA:
    """Mixin: publish latent grid and step before each step's noise prediction."""

    def _lvsa_init(self, od_config) -> None:
        self._lvsa_active = lvsa_selected(od_config)
        self._lvsa_od_config = od_config

    def predict_noise_maybe_with_cfg(self, *args, **kwargs):
        if self._lvsa_active:
            self._lvsa_publish(kwargs.get("positive_kwargs") or (args[2] if len(args) > 2 else None))
        return super().predict_noise_maybe_with_cfg(*args, **kwargs)

    def _lvsa_publish(self, model_kwargs: dict[str, Any] | None) -> None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        step = step_index(timesteps, self._current_timestep)
        set_forward_context_denoise_step_idx(step)
        if timesteps is not None:
            set_forward_context_denoise_total_steps(len(timesteps))
        hidden = (model_kwargs or {}).get("hidden_states")
        if hidden is None or not is_forward_context_available():
            return
        tr = self.transformer
        pt, p = int(getattr(tr, "patch_size_t", 1) or 1), int(getattr(tr, "patch_size", 1) or 1)
        _, _, frames, height, width = hidden.shape
        runtime_for(self._lvsa_od_config).publish(get_forward_context(), (frames // pt, height // p, width // p))


class LVSAHunyuanVideo15Pipeline(_PublishesToLVSA, HunyuanVideo15Pipeline):
    """``HunyuanVideo15Pipeline`` (text-to-video) publishing geometry and step to lvsa."""

    def __init__(self, *, od_config, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        self._lvsa_init(od_config)


class LVSAHunyuanVideo15I2VPipeline(_PublishesToLVSA, HunyuanVideo15I2VPipeline):
    """``HunyuanVideo15I2VPipeline`` (image-to-video) publishing geometry and step to lvsa."""

    def __init__(self, *, od_config, prefix: str = ""):
        super().__init__(od_config=od_config, prefix=prefix)
        self._lvsa_init(od_config)
