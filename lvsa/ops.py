"""Shared tensor helpers: input validation, log-sum-exp merging, dense attention."""
from __future__ import annotations

import contextlib
import contextvars
import threading
import math
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import LVSAInputError  # noqa: F401 (re-export)
from .mask import BlockMask


def _shape(t):
    return "x".join(map(str, t.shape))


def validate_inputs(q, k, v, mask: Optional[BlockMask], text_k=None, text_v=None,
                    scale=None, check_finite: bool = False, q_rows=None) -> None:
    """Raise :class:`LVSAInputError` naming the tensor and the fix on any mismatch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise LVSAInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise LVSAInputError(
                f"{name} has shape {_shape(t)}; lvsa expects [B, S, H, D] (batch, tokens, heads, head_dim)")
    if k.shape != v.shape:
        raise LVSAInputError(f"k {_shape(k)} and v {_shape(v)} must have the same shape")
    B, S, H, D = q.shape
    if q_rows is not None:
        lo, hi = (int(x) for x in q_rows)
        if not (0 <= lo < hi <= k.shape[1]) or hi - lo != S:
            raise LVSAInputError(
                f"q_rows=({lo}, {hi}) must be a range inside the {k.shape[1]} key tokens with hi - lo equal "
                f"to q's {S} rows (q holds query rows [lo, hi) of the whole sequence)")
        S = k.shape[1]
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise LVSAInputError(
            f"q {_shape(q)} and k {_shape(k)} disagree: batch, tokens and head_dim must match "
            "(self-attention over the same video sequence)")
    Hkv = k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise LVSAInputError(f"q has {H} heads and k/v {Hkv}: the query heads must be a whole "
                             "multiple of the K/V heads (GQA)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise LVSAInputError(f"q dtype {q.dtype} is not supported: use bfloat16, float16 or float32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise LVSAInputError(f"{name} is {t.dtype} but q is {q.dtype}: cast all three to one dtype")
        if t.device != q.device:
            raise LVSAInputError(f"{name} is on {t.device} but q is on {q.device}: move them to one device")
    if (text_k is None) != (text_v is None):
        raise LVSAInputError("text_k and text_v must be given together")
    if text_k is not None:
        for name, t in (("text_k", text_k), ("text_v", text_v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise LVSAInputError(f"{name} must be a [B, L, Hkv, D] tensor")
            if t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
                raise LVSAInputError(
                    f"{name} has shape {_shape(t)}; expected [{B}, L, {Hkv}, {D}] to match k")
            if t.dtype != q.dtype or t.device != q.device:
                raise LVSAInputError(f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}")
        if text_k.shape != text_v.shape:
            raise LVSAInputError(f"text_k {_shape(text_k)} and text_v {_shape(text_v)} differ")
    if mask is not None:
        P = mask.tokens_per_frame
        if S % mask.num_frames or (P and S != mask.num_frames * P):
            raise LVSAInputError(
                f"sequence length {S} is not T*P for the mask (T={mask.num_frames}"
                f"{', P=' + str(P) if P else ''}): pass only the video tokens, frame-major, "
                "and give text tokens as text_k/text_v")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise LVSAInputError(f"scale must be a finite number > 0, got {scale!r}")
    if check_finite:
        tensors = [("q", q), ("k", k), ("v", v)]
        if text_k is not None:
            tensors += [("text_k", text_k), ("text_v", text_v)]
        for name, t in tensors:
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise LVSAInputError(f"{name} holds {bad} non-finite values (NaN/Inf) "
                                     "(LVSA_CHECK=1 rejects them; fix the upstream layer)")


@contextlib.contextmanager
def cacheable() -> Iterator[None]:
    """Build tensors that a cache keeps for later calls: outside ``torch.inference_mode()``
    and without grad.

    A tensor made under ``torch.inference_mode()`` (how generation runs) is an *inference
    tensor*; once cached, a later call under autograd (fine-tuning the same transformer
    after generating) that indexes with it or otherwise saves it for backward fails with
    "Inference tensors cannot be saved for backward". Tensors built in this block are normal
    tensors (and hold no graph), so they serve calls in every mode."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge two partial softmax-attention results over disjoint key sets.

    ``out_*``: ``[..., D]`` normalised partial outputs; ``lse_*``: ``[...]`` natural-log
    sum-exp of the scaled logits (``-inf`` for an empty key set). Returns
    ``(out, lse)`` in float32.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    den = wa + wb
    out = (out_a.float() * wa.unsqueeze(-1) + out_b.float() * wb.unsqueeze(-1)) / den.unsqueeze(-1)
    return out, m + torch.log(den)


def append_text(k, v, text_k=None, text_v=None):
    """``(k, v)`` with the text keys and values appended after the video tokens (dim 1):
    the joint key sequence of a query that attends every text key. ``k`` and ``v``
    themselves (no copy) when there is no text (``None``, or no tokens)."""
    if text_k is None or text_k.shape[1] == 0:
        return k, v
    return torch.cat([k, text_k], dim=1), torch.cat([v, text_v], dim=1)


def sdpa(q, k, v, scale, attn_mask=None):
    """SDPA over ``[B, S, H, D]`` tensors with GQA; returns ``[B, S, H, D]``."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kt.shape[1] != qt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt = kt.repeat_interleave(rep, dim=1)
        vt = vt.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=scale)
    return o.transpose(1, 2)


#: ``fn(q, k, v, text_k, text_v, scale) -> out``: a dense attention kernel (same contract
#: as :func:`dense_attention`)
DenseKernel = Callable[..., torch.Tensor]
_dense_kernel: contextvars.ContextVar[Optional[DenseKernel]] = contextvars.ContextVar(
    "lvsa_dense_kernel", default=None)
#: open :func:`dense_kernel` blocks in the process: :func:`dense_attention` reads the context
#: variable only when one is open (torch.compile cannot trace ``ContextVar.get``; a plain int
#: keeps the usual path one graph)
_dense_blocks = 0
_dense_blocks_lock = threading.Lock()


@contextlib.contextmanager
def dense_kernel(fn: Optional[DenseKernel]) -> Iterator[None]:
    """Inside the block (this thread / task only), :func:`dense_attention` — the engine's
    full-density path: dense-by-design masks and geometry fallbacks — runs
    ``fn(q, k, v, text_k, text_v, scale)`` instead of torch SDPA; ``None`` keeps SDPA.

    The one place a caller routes lvsa's dense calls to another kernel (``lvsa bench
    model`` runs its *best dense* row on FlashAttention-4's dense forward this way when
    that is the card's fastest). ``fn`` must compute exactly what :func:`dense_attention`
    does: every query over every video (+ text) key, ``scale`` or ``1/sqrt(D)``."""
    global _dense_blocks
    token = _dense_kernel.set(fn)
    with _dense_blocks_lock:
        _dense_blocks += 1
    try:
        yield
    finally:
        _dense_kernel.reset(token)
        with _dense_blocks_lock:
            _dense_blocks -= 1


def dense_attention(q, k, v, text_k=None, text_v=None, scale=None):
    """Full attention of every query over video (+ text) keys: the dense path (torch SDPA,
    or the kernel a :func:`dense_kernel` block set)."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    fn = _dense_kernel.get() if _dense_blocks else None
    if fn is not None:
        return fn(q, k, v, text_k, text_v, scale)
    return sdpa(q, *append_text(k, v, text_k, text_v), scale)


def attention_lse(q, k, v, scale):
    """Plain attention returning ``(out [B,S,H,D] float32, lse [B,S,H] float32)``;
    used by tests and emulations, not in hot paths."""
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    if kt.shape[1] != qt.shape[1]:
        rep = qt.shape[1] // kt.shape[1]
        kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.softmax(s, dim=-1), vt)
    return o.transpose(1, 2), lse.transpose(1, 2)
