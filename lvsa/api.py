"""The low-level public entry point: :func:`attention` over a given :class:`BlockMask`."""
from __future__ import annotations

import functools
import os
from typing import Optional

from .config import Config
from .mask import BlockMask


@functools.lru_cache(maxsize=16)
def _config_for(env_items: tuple) -> Config:
    return Config.load(env=dict(env_items))


def current_config() -> Config:
    """The configuration from the current ``LVSA_*`` environment (cached per environment)."""
    items = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("LVSA_")))
    return _config_for(items)


def attention(q, k, v, mask: BlockMask, text_k=None, text_v=None, scale: Optional[float] = None,
              backend: Optional[str] = None, config: Optional[Config] = None, q_rows=None):
    """Exact block-sparse attention of video queries over the frames ``mask`` allows.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, S, H, D]`` video queries, frame-major (``S = T * P``).
    k, v : torch.Tensor
        ``[B, S, Hkv, D]``; ``H % Hkv == 0`` (GQA).
    mask : BlockMask
        From :func:`lvsa.plan_schedule` (``schedule.mask_for_step(step)``).
    text_k, text_v : torch.Tensor, optional
        ``[B, L, Hkv, D]`` text keys/values every video query also attends to.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    backend : str, optional
        A backend name (strict: refusal raises) or ``None`` for the precedence
        argument → :func:`lvsa.use_backend` → ``LVSA_BACKEND`` → auto.
    q_rows : tuple of int, optional
        ``(lo, hi)``: ``q`` is ``[B, hi - lo, H, D]``, the query rows ``[lo, hi)`` of the
        sequence, computed against all of ``k``/``v`` with the same ``mask`` (sequence
        parallelism: the result equals rows ``[lo, hi)`` of the full call). Any range;
        frames may be cut. Backends declare it with ``supports_q_rows``.

    Returns
    -------
    torch.Tensor
        ``[B, S, H, D]`` (``[B, hi - lo, H, D]`` with ``q_rows``) in ``q``'s dtype.
    """
    from .dispatch import run_attention

    out, _, _ = run_attention(q, k, v, mask, text_k, text_v, scale, backend=backend,
                              config=config, origin="lvsa.attention", q_rows=q_rows)
    return out
