"""lvsa inside diffusers video pipelines: :func:`enable` and :func:`disable`.

>>> import lvsa
>>> pipe = WanPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers")   # doctest: +SKIP
>>> lvsa.enable(pipe, sparsity_scale=1.0)                                      # doctest: +SKIP
>>> video = pipe(prompt, num_frames=161).frames[0]                             # doctest: +SKIP
>>> lvsa.integrations.last_summary(pipe)                                       # doctest: +SKIP
{'backend': 'triton', 'sparse_calls': 3000, 'dense_calls': 0, 'fallbacks': 0, ...}

Supported: ``WanPipeline`` (Wan 2.1/2.2 T2V, both transformers of 2.2 A14B; the
image-to-video pipelines too: their image context lives in cross-attention, which lvsa
leaves alone), ``HunyuanVideo15Pipeline`` and ``CogVideoXPipeline``. A bare transformer
is accepted as well (geometry then comes from settings/``LVSA_*`` only).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .base import STATE_ATTR, LVSAState, is_pipeline, lvsa_class, transformers_of
from .registry import adapter_for_family, adapter_for_transformer  # noqa: F401

__all__ = ["enable", "disable", "is_enabled", "engine_of", "last_summary", "adapter_for_family",
           "adapter_for_transformer"]


def enable(pipe, **settings):
    """Put lvsa into the self-attention of a diffusers video pipeline.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline or a transformer model
        ``WanPipeline`` / ``HunyuanVideo15Pipeline`` / ``CogVideoXPipeline`` (or their
        image-to-video siblings), or a bare ``*Transformer3DModel``.
    **settings
        Any :class:`lvsa.Config` field (``sparsity_scale=0.8``, ``backend="triton"``,
        ``reference_latent_frames=21``, ``window_size=16``, ``riflex=True`` for RIFLEx, see
        :mod:`lvsa.integrations.riflex` …). Precedence: these keyword
        arguments > ``LVSA_CONFIG`` > ``LVSA_*`` > defaults. Geometry (tokens per frame,
        latent frames) and the reference horizon come from the pipeline at call time
        unless set here or through ``LVSA_*``.

    Returns
    -------
    The same object, for chaining. Calling :func:`enable` again replaces the settings.
    """
    from ..engine import Engine

    if is_enabled(pipe):
        disable(pipe)
    trs = transformers_of(pipe)
    adapter = adapter_for_transformer(trs[0])
    engine = Engine(family=adapter.family, **settings)  # bad settings raise here, before any change
    pipeline = is_pipeline(pipe)
    state = LVSAState(pipe, adapter, engine, type(pipe) if pipeline else None)
    try:
        state.install()
    except Exception:
        state.uninstall()
        raise
    object.__setattr__(pipe, STATE_ATTR, state)
    if pipeline:
        object.__setattr__(pipe, "__class__", lvsa_class(type(pipe)))
    return pipe


def disable(pipe):
    """Restore the original attention processors and pipeline class (no-op if not enabled)."""
    if not hasattr(pipe, "__dict__"):
        raise TypeError(
            f"lvsa.disable() takes the pipeline or transformer given to lvsa.enable(), got "
            f"{type(pipe).__name__} (which lvsa cannot have been enabled on)")
    state: Optional[LVSAState] = pipe.__dict__.get(STATE_ATTR)
    if state is None:
        return pipe
    state.uninstall()
    if state.original_class is not None:
        object.__setattr__(pipe, "__class__", state.original_class)
    del pipe.__dict__[STATE_ATTR]
    return pipe


def is_enabled(pipe) -> bool:
    return STATE_ATTR in getattr(pipe, "__dict__", {})


def engine_of(pipe):
    """The :class:`lvsa.engine.Engine` serving ``pipe`` (``None`` when lvsa is off)."""
    state = getattr(pipe, "__dict__", {}).get(STATE_ATTR)
    return None if state is None else state.engine


def last_summary(pipe) -> Optional[Dict[str, Any]]:
    """The engine's summary of the last pipeline call: backend, sparse/dense calls, fallbacks."""
    state = getattr(pipe, "__dict__", {}).get(STATE_ATTR)
    return None if state is None else state.last_summary
