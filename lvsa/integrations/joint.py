"""Joint video+text self-attention for the video queries, shared by every integration
whose model attends video and text tokens in one sequence (the diffusers HunyuanVideo 1.5
processor, the vllm-omni plugin's ``[video | text]`` sequences).

The video queries attend to the video keys through the engine (sparse by frame) and to
every *valid* text key (dense), merged exactly by the engine's backend. Prompts of
different lengths in one batch (a per-sample text mask) have different valid keys:
those run one engine call per sample.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def video_attention_with_text(engine, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              text_k: torch.Tensor, text_v: torch.Tensor,
                              text_valid: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
    """Attention of the video queries over the video keys and the valid text keys.

    Parameters
    ----------
    engine : lvsa.engine.Engine
        The engine of the model (schedule, backends, fallback lines).
    q : torch.Tensor
        ``[B, Sq, H, D]`` video queries (all of them, or the rows ``q_rows`` names).
    k, v : torch.Tensor
        ``[B, S, H, D]`` video keys and values.
    text_k, text_v : torch.Tensor
        ``[B, L, H, D]`` text (or other non-video) keys and values.
    text_valid : torch.Tensor, optional
        ``[B, L]`` bool, ``True`` where a text key may be attended; ``None``: every one.
    **kwargs
        Passed to :meth:`~lvsa.engine.Engine.attention` (``scale``, ``origin``, ``q_rows``).

    Returns
    -------
    torch.Tensor
        ``[B, Sq, H, D]``, the dtype the engine returns.
    """
    if text_valid is None:
        return engine.attention(q, k, v, text_k=text_k, text_v=text_v, **kwargs)
    if bool((text_valid == text_valid[:1]).all()):  # the same valid keys in every sample: one call
        sel = text_valid[0]
        tk, tv = (text_k[:, sel], text_v[:, sel]) if bool(sel.any()) else (None, None)
        return engine.attention(q, k, v, text_k=tk, text_v=tv, **kwargs)
    outs = []  # prompts of different lengths in one batch: one call per sample
    for b in range(q.shape[0]):
        sel = text_valid[b]
        tk = text_k[b:b + 1, sel] if bool(sel.any()) else None
        tv = text_v[b:b + 1, sel] if bool(sel.any()) else None
        outs.append(engine.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], text_k=tk, text_v=tv, **kwargs))
    return torch.cat(outs, dim=0)


__all__ = ["video_attention_with_text"]
