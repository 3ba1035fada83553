"""The low-level public entry point: :func:`attention` over a given :class:`BlockMask`."""
from __future__ import annotations

from typing import Optional

from .config import Config, current_config  # noqa: F401 (current_config: re-export)
from .errors import LVSAInputError
from .mask import BlockMask


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
    if not isinstance(mask, BlockMask):
        raise LVSAInputError(
            f"mask must be a lvsa.BlockMask, got {type(mask).__name__}: plan one with "
            "lvsa.plan_schedule(T, W, n, reference).mask_for_step(step) (or lvsa.dense_mask(T))")
    from .dispatch import run_attention  # lazy: pluggy loads on first use

    out, _, _ = run_attention(q, k, v, mask, text_k, text_v, scale, backend=backend,
                              config=config, origin="lvsa.attention", q_rows=q_rows)
    return out
