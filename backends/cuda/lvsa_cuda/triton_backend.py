"""The ``triton`` backend: a block-sparse flash-attention kernel driven by the BlockMask.

How the kernel walks the mask
-----------------------------
One program computes one query tile (``BLOCK_M`` rows of one query frame ``f``) for one
(batch, head). Query tiles never cross a frame boundary, so every row of a tile attends
to the same key frames: ``attended(f)`` (the CSR row ``indices[indptr[f]:indptr[f+1]]``).

The attended frames of ``f``, concatenated, form a *packed* key sequence of
``n_f * P`` tokens. The kernel walks that packed sequence in tiles of ``BLOCK_N``
tokens; packed position ``pos`` is token ``indices[indptr[f] + pos // P] * P + pos % P``
of the caller's K/V. A tile may therefore straddle two attended frames (or, for
``P < BLOCK_N``, several): consecutive attended frames are merged into one contiguous
stream, and only the very last tile of the stream is partial. The key loop is split
into an unmasked loop over full tiles and at most one masked tail tile; query rows are
masked only in the last tile of a frame (``P`` need not be a multiple of any block
size). No K/V is copied or compacted.

Text tokens (``text_k``/``text_v``, attended by every query) are one extra range,
read from their own pointers, in the same online softmax: the result is the exact
softmax over ``attended video keys ∪ text keys``.

GQA: query head ``h`` reads K/V head ``h // (H // Hkv)``. Any strides are accepted
(the last dimension must be contiguous).

Tuning (Hopper)
---------------
Default: ``BLOCK_M = BLOCK_N = 128``, 8 warps, 3 stages, mode ``tma``: per query frame
a table of affine 128-token key tiles (runs of consecutive attended frames) loaded
through TMA tensor descriptors, the partial tail of each run cut into 32-wide masked
tiles, and the last ``P % 128`` query rows of each frame (24 for P = 1560) done by a
second, narrow launch instead of a mostly empty 128-row tile. Chosen from the H200
sweep in ``benchmarks/NOTES.md`` (tma 59.3 ms → 55.2 ms with the tails, against 66.9 ms
for pointer loads, at Wan 1.3B T_lat 81). Other modes: ``span`` (pointer loads, no
tile table), ``tiles`` (pointer loads; used instead of ``tma`` when K/V are not
contiguous), ``gather`` (any P).
Override with ``LVSA_TRITON_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages[,mode]"``.
The grid is ordered query-tile-fastest, so programs running together share most of
their K/V in L2.

Runs under ``TRITON_INTERPRET=1`` on the CPU (CI checks it against the reference).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from lvsa_cuda import CudaBackend, concrete_device, device_guard
from lvsa.config import Setting
from lvsa.hookspecs import hookimpl
from lvsa.mask import BlockMask, token_ranges
from lvsa.ops import default_scale

try:  # the backend registers (and explains itself) even where triton is missing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634

MODES = {"gather": 0, "span": 1, "tiles": 2, "tma": 3}
#: default (BLOCK_M, BLOCK_N, num_warps, num_stages, mode) by head_dim, from the H200 sweep
DEFAULT_CONFIGS = {
    64: (128, 128, 8, 3, "tma"),
    128: (128, 128, 8, 3, "tma"),
}
#: before Hopper (no TMA, ~100-164 KB of shared memory): pointer loads, smaller tiles.
#: Not measured (only an H200 was at hand): chosen to fit sm_80/86/89 shared memory.
PRE_HOPPER_CONFIG = (64, 64, 4, 2, "span")
#: small blocks for the CPU interpreter (fast, and every tail path is exercised)
INTERPRET_CONFIG = (16, 16, 4, 1, "span")
#: width of the key tiles that cover the partial tail of each run (modes tiles/tma)
TAIL_BLOCK_N = 32


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_shims() -> None:
    """Two bugs of Triton 3.6's CPU interpreter, patched under ``TRITON_INTERPRET=1`` only
    (nothing changes on the GPU path):

    * a scalar tensor used as a loop bound goes through ``int(array_of_shape_1)``, which
      numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted");
    * ``tl.dot`` on bfloat16 multiplies the raw uint16 storage; convert to float32 first.
    """
    try:
        import numpy as np
        import triton.runtime.interpreter as ti
    except ImportError:  # pragma: no cover
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is not None and not getattr(orig, "_lvsa_shim", False):
        def patched(tensor, scope):
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        patched._lvsa_shim = True
        ti._patch_lang_tensor = patched
    builder = getattr(ti, "InterpreterBuilder", None)
    convert = getattr(ti, "_convert_float", None)
    dot = getattr(builder, "create_dot", None)
    if dot is not None and convert is not None and not getattr(dot, "_lvsa_shim", False):
        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            def up(x):
                if x.dtype.scalar == tl.bfloat16:
                    data = convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                    return ti.TensorHandle(data, tl.float32)
                return x
            return dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

        create_dot._lvsa_shim = True
        builder.create_dot = create_dot


if triton is not None and interpreting():
    _interpreter_shims()


def parse_config(text: str) -> Tuple[int, int, int, int, str]:
    """``"BLOCK_M,BLOCK_N,num_warps,num_stages[,mode]"`` → tuple, with a clear error."""
    parts = [x.strip() for x in text.split(",")]
    mode = parts.pop() if len(parts) == 5 else "span"
    try:
        bm, bn, w, st = (int(x) for x in parts)
    except ValueError:
        raise ValueError(
            f"LVSA_TRITON_CONFIG={text!r}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages[,mode]' "
            f"with mode one of {', '.join(MODES)}, e.g. '128,128,8,3,span'") from None
    for name, val in (("BLOCK_M", bm), ("BLOCK_N", bn)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"LVSA_TRITON_CONFIG={text!r}: {name} must be a power of two >= 16")
    if mode not in MODES:
        raise ValueError(f"LVSA_TRITON_CONFIG={text!r}: mode must be one of {', '.join(MODES)}")
    return bm, bn, w, st, mode


def _parse_setting(var, value):
    return parse_config(str(value).strip())


#: ``LVSA_TRITON_CONFIG``: declared on the backend (``lvsa info --vars`` lists it)
CONFIG_SETTING = Setting(
    "LVSA_TRITON_CONFIG", _parse_setting, None,
    "triton kernel tiling 'BLOCK_M,BLOCK_N,num_warps,num_stages[,mode]' (mode: "
    + "/".join(MODES) + "); default by head_dim and GPU", owner="lvsa-cuda: triton")


def choose_config(head_dim: int, compute_capability: Optional[Tuple[int, int]] = None
                  ) -> Tuple[int, int, int, int, str]:
    env = CONFIG_SETTING.read()
    if env:
        return env
    if interpreting():
        return INTERPRET_CONFIG
    if compute_capability is not None and tuple(compute_capability) < (9, 0):
        return PRE_HOPPER_CONFIG
    return DEFAULT_CONFIGS.get(head_dim, (128, 64, 8, 2, "span"))


def tile_table(mask: BlockMask, P: int, block_n: int, tail_n: Optional[int] = None):
    """Per query frame, the attended key tokens as affine tiles of ``block_n``.

    The attended frames are merged into runs of consecutive frames; each run of
    ``r`` frames is ``r * P`` contiguous tokens, cut into full tiles of ``block_n``
    and a partial tail, which is cut into pieces of ``tail_n`` (default ``block_n``;
    the last piece masked). Per frame the full tiles come first, then the tail pieces,
    so the kernel runs an unmasked loop and a short masked one of narrow tiles.

    Returns
    -------
    (ptr, nfull, tok, length) : lists of int
        ``ptr`` ``[T+1]`` CSR over frames; ``nfull`` ``[T]`` full tiles per frame;
        ``tok`` first token of each tile; ``length`` valid tokens of each tile.
    """
    tail_n = tail_n or block_n
    ptr, nfull, tok, length = [0], [], [], []
    for f in range(mask.num_frames):
        full, tails = [], []
        for a, b in token_ranges(mask.attended(f)):
            start, n = a * P, (b - a + 1) * P
            end = start + n
            full.extend(range(start, start + (n // block_n) * block_n, block_n))
            for t0 in range(start + (n // block_n) * block_n, end, tail_n):
                tails.append((t0, min(tail_n, end - t0)))
        tok.extend(full)
        length.extend([block_n] * len(full))
        tok.extend(t for t, _ in tails)
        length.extend(n for _, n in tails)
        nfull.append(len(full))
        ptr.append(len(tok))
    return ptr, nfull, tok, length


def _check_last_dim(name, t):
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, "
                         f"got strides {tuple(t.stride())}")


if triton is not None:

    @triton.jit
    def _softmax_step(acc, m_i, l_i, q, k, v, col_ok, qk_scale, MASKED: tl.constexpr):
        """One key tile of the online softmax (base-2 exponentials), K/V already loaded."""
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_new, l_i

    @triton.jit
    def _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, col_ok, qk_scale,
                MASKED: tl.constexpr):
        """One key tile through pointers (masked rows read as zeros)."""
        if MASKED:
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return _softmax_step(acc, m_i, l_i, q, k, v, col_ok, qk_scale, MASKED)

    @triton.jit
    def _attend_text(acc, m_i, l_i, q, tkbase, tvbase, stks, stvs, L, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        """The text keys ``[0, L)`` (their own pointers) as masked tiles of the softmax."""
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        for j0 in range(0, L, BLOCK_N):
            pos = j0 + offs_n
            acc, m_i, l_i = _attend(acc, m_i, l_i, q,
                                    tkbase + pos[:, None].to(tl.int64) * stks + offs_d[None, :],
                                    tvbase + pos[:, None].to(tl.int64) * stvs + offs_d[None, :],
                                    pos < L, qk_scale, True)
        return acc, m_i, l_i

    # the row range of a sequence-parallel rank is a plain runtime value: one compiled
    # kernel serves every rank and the whole-sequence launch (no per-range variant)
    @triton.jit(do_not_specialize=["F0", "LO", "HI"])
    def _lvsa_fwd(Q, K, V, TK, TV, O, KD, VD, indptr, indices,
                  tile_ptr, tile_nfull, tile_tok, tile_len,
                  sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
                  stkb, stks, stkh, stvb, stvs, stvh, sob, sos, soh,
                  S, H, GROUP, P, F0, LO, HI, TILES, ROW0, L, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_NT: tl.constexpr, HAS_TEXT: tl.constexpr, MODE: tl.constexpr):
        # MODE 0 "gather": packed stream, per-row frame lookup (any P)
        # MODE 1 "span":   packed stream, a tile spans <= 2 frames (P >= BLOCK_N), scalar math
        # MODE 2 "tiles":  per-frame table of affine tiles (runs of frames), pointer loads
        # MODE 3 "tma":    the same table, K/V through TMA tensor descriptors
        # (modes 2/3: the partial tail of each run is cut into BLOCK_NT-wide pieces)
        # Query rows ROW0 + [t*BLOCK_M, (t+1)*BLOCK_M) of frame f (ROW0 > 0: tail launch).
        # Q/O hold the sequence's rows [LO, HI) (all of them, or a sequence-parallel rank's
        # share); the grid starts at frame F0 = LO // P.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        f = F0 + pid_m // TILES
        t = pid_m - (f - F0) * TILES
        b = pid_bh // H
        h = pid_bh - b * H
        hk = h // GROUP
        b64 = b.to(tl.int64)

        offs_d = tl.arange(0, HEAD_DIM)
        rows = ROW0 + t * BLOCK_M + tl.arange(0, BLOCK_M)
        gtok = f * P + rows
        row_ok = (rows < P) & (gtok >= LO) & (gtok < HI)
        qtok = (gtok - LO).to(tl.int64)
        q = tl.load(Q + b64 * sqb + h * sqh + qtok[:, None] * sqs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        kbase = K + b64 * skb + hk * skh
        vbase = V + b64 * svb + hk * svh
        offs_n = tl.arange(0, BLOCK_N)
        if MODE <= 1:
            start = tl.load(indptr + f)
            cnt = tl.load(indptr + f + 1) - start
            nk = cnt * P  # packed key tokens of frame f
            n_full = nk // BLOCK_N
            for j in range(0, n_full):
                pos = j * BLOCK_N + offs_n
                if MODE == 0:
                    kf = pos // P
                    fid = tl.load(indices + start + kf)
                    tok = (fid * P + (pos - kf * P)).to(tl.int64)
                else:
                    p0 = j * BLOCK_N
                    kf0 = p0 // P
                    r0 = p0 - kf0 * P
                    fid0 = tl.load(indices + start + kf0)
                    fid1 = tl.load(indices + start + tl.minimum(kf0 + 1, cnt - 1))
                    split = P - r0
                    tok = tl.where(offs_n < split, fid0 * P + r0 + offs_n,
                                   fid1 * P + offs_n - split).to(tl.int64)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q,
                                        kbase + tok[:, None] * sks + offs_d[None, :],
                                        vbase + tok[:, None] * svs + offs_d[None, :],
                                        pos < nk, qk_scale, False)
            if n_full * BLOCK_N < nk:
                pos = n_full * BLOCK_N + offs_n
                ok = pos < nk
                kf = pos // P
                fid = tl.load(indices + start + kf, mask=ok, other=0)
                tok = (fid * P + (pos - kf * P)).to(tl.int64)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q,
                                        kbase + tok[:, None] * sks + offs_d[None, :],
                                        vbase + tok[:, None] * svs + offs_d[None, :],
                                        ok, qk_scale, True)
        else:
            t0 = tl.load(tile_ptr + f)
            t1 = tl.load(tile_ptr + f + 1)
            tf = t0 + tl.load(tile_nfull + f)
            for i in range(t0, tf):
                tok0 = tl.load(tile_tok + i)
                if MODE == 3:
                    k = KD.load([b * S + tok0, hk * HEAD_DIM])
                    v = VD.load([b * S + tok0, hk * HEAD_DIM])
                    acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, offs_n < BLOCK_N,
                                                  qk_scale, False)
                else:
                    tok = (tok0 + offs_n).to(tl.int64)
                    acc, m_i, l_i = _attend(acc, m_i, l_i, q,
                                            kbase + tok[:, None] * sks + offs_d[None, :],
                                            vbase + tok[:, None] * svs + offs_d[None, :],
                                            offs_n < BLOCK_N, qk_scale, False)
            offs_nt = tl.arange(0, BLOCK_NT)
            for i in range(tf, t1):
                tok = (tl.load(tile_tok + i) + offs_nt).to(tl.int64)
                ok = offs_nt < tl.load(tile_len + i)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q,
                                        kbase + tok[:, None] * sks + offs_d[None, :],
                                        vbase + tok[:, None] * svs + offs_d[None, :],
                                        ok, qk_scale, True)
        if HAS_TEXT:
            acc, m_i, l_i = _attend_text(acc, m_i, l_i, q, TK + b64 * stkb + hk * stkh,
                                         TV + b64 * stvb + hk * stvh, stks, stvs, L, qk_scale,
                                         HEAD_DIM, BLOCK_N)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + b64 * sob + h * soh + qtok[:, None] * sos + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _text_continue_fwd(Q, TK, TV, O, LSE2,
                           sqb, sqs, sqh, stkb, stks, stkh, stvb, stvs, stvh,
                           sob, sos, soh, slb, sls, slh,
                           S, H, GROUP, L, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """Continue a finished softmax with the text keys, in place: the state of each
        row is (normalised output ``O``, base-2 LSE ``LSE2``), i.e. ``m = LSE2, l = 1``."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh - b * H
        hk = h // GROUP
        b64 = b.to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < S
        r64 = rows.to(tl.int64)
        q = tl.load(Q + b64 * sqb + h * sqh + r64[:, None] * sqs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        o_ptrs = O + b64 * sob + h * soh + r64[:, None] * sos + offs_d[None, :]
        acc = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        m_i = tl.load(LSE2 + b64 * slb + h * slh + r64 * sls, mask=row_ok, other=0.0)
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        acc, m_i, l_i = _attend_text(acc, m_i, l_i, q, TK + b64 * stkb + hk * stkh,
                                     TV + b64 * stvb + hk * stvh, stks, stvs, L, qk_scale,
                                     HEAD_DIM, BLOCK_N)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


#: the text merge's launch on a GPU: query rows per program, text keys per step, warps, stages.
#: The fastest of 22 on the H200 at HunyuanVideo's text shapes (text-merge-sweep-hy-*: 0.84 ms
#: against 1.12 ms for (128, 64, 8, 2) at T_lat 65 + 256 text, 2.02 against 2.60 at T_lat 81 batch 2)
TEXT_CONFIG = (64, 32, 4, 2)


def attend_text_into(out, lse2, q, text_k, text_v, scale: Optional[float] = None,
                     block_m: Optional[int] = None, config: Optional[Tuple[int, int, int, int]] = None):
    """Merge dense text attention exactly into a finished sparse result, in place.

    Parameters
    ----------
    out : torch.Tensor
        ``[B, S, H, D]``, the normalised sparse output; overwritten with the result.
    lse2 : torch.Tensor
        ``[B, S, H]`` float32, **base-2** log-sum-exp of the scaled logits of the sparse
        part (FlashInfer's convention: ``lse2 = lse / ln 2``).
    q : torch.Tensor
        ``[B, S, H, D]``.
    text_k, text_v : torch.Tensor
        ``[B, L, Hkv, D]``.

    No temporary as large as the output is made (the state is read and written in
    place, the arithmetic is float32 in registers). ``config`` ``(block_m, block_n, warps,
    stages)`` overrides :data:`TEXT_CONFIG` on a GPU (``benchmarks/text_merge_sweep.py``).
    """
    B, S, H, D = q.shape
    Hkv, L = text_k.shape[2], text_k.shape[1]
    scale = default_scale(D) if scale is None else float(scale)
    for name, t in (("q", q), ("out", out), ("text_k", text_k), ("text_v", text_v)):
        _check_last_dim(name, t)
    if interpreting():
        bm, bn, warps, stages = 16, 16, 4, 2
    else:
        bm, bn, warps, stages = config or TEXT_CONFIG
        bm = block_m or bm
    grid = (triton.cdiv(S, bm), B * H)
    _text_continue_fwd[grid](
        q, text_k, text_v, out, lse2,
        q.stride(0), q.stride(1), q.stride(2),
        text_k.stride(0), text_k.stride(1), text_k.stride(2),
        text_v.stride(0), text_v.stride(1), text_v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse2.stride(0), lse2.stride(1), lse2.stride(2),
        S, H, H // Hkv, L, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return out


@dataclass
class TritonPlan:
    """Device copies of the mask's CSR (``indptr`` ``[T+1]``, ``indices`` ``[nnz]``, int32)
    and, built on first use, its tile tables (:func:`tile_table`) per tiling. The
    dispatcher caches the plan; the plan keeps its own tile tables. A first use under
    ``torch.inference_mode()`` makes them inference tensors, which is harmless: they are
    only ever kernel pointer arguments, never written and never seen by autograd."""

    mask: BlockMask
    num_frames: int
    indptr: torch.Tensor
    indices: torch.Tensor
    _tiles: dict = field(default_factory=dict, repr=False)
    #: query rows ``[lo, hi)`` the run's ``q`` holds (sequence parallelism); ``None`` = all
    q_rows: Optional[Tuple[int, int]] = None

    def tiles(self, P: int, block_n: int, tail_n: int):
        key = (P, block_n, tail_n)
        hit = self._tiles.get(key)
        if hit is None:
            hit = tuple(torch.tensor(x, dtype=torch.int32, device=self.indptr.device)
                        for x in tile_table(self.mask, P, block_n, tail_n))
            self._tiles[key] = hit
        return hit


def plan_for(mask: BlockMask, device) -> TritonPlan:
    """The mask's CSR on ``device``."""
    indptr, indices = mask.csr_tensors(device)
    return TritonPlan(mask, mask.num_frames, indptr, indices)


def block_sparse_attention(plan: TritonPlan, q, k, v, text_k=None, text_v=None,
                           scale: Optional[float] = None, config=None, out=None, q_rows=None):
    """Launch the kernel. Shapes as in :meth:`lvsa.backend.Backend.run`.

    Parameters
    ----------
    plan : TritonPlan
    q : torch.Tensor
        ``[B, S, H, D]``, ``S = T * P``, frame-major; with ``q_rows=(lo, hi)`` (or a plan
        made for them) ``[B, hi - lo, H, D]``: only those query rows (sequence parallelism;
        the launch covers just the frames they touch).
    k, v : torch.Tensor
        ``[B, S, Hkv, D]``.
    text_k, text_v : torch.Tensor, optional
        ``[B, L, Hkv, D]``.
    config : tuple, optional
        ``(BLOCK_M, BLOCK_N, num_warps, num_stages, mode)``; default by head_dim.
    out : torch.Tensor, optional
        ``[B, S, H, D]`` to write into.
    """
    if not isinstance(plan, TritonPlan):
        raise TypeError(f"block_sparse_attention() takes a TritonPlan (plan_for(mask, device)), "
                        f"got {type(plan).__name__}")
    if plan.indptr.device != q.device:
        raise ValueError(f"the triton plan is on {plan.indptr.device} but q is on {q.device}: "
                         "plan for the tensors' device")
    if q_rows is None:
        q_rows = plan.q_rows
    B, _, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    T = plan.num_frames
    P = S // T
    lo, hi = (0, S) if q_rows is None else (int(q_rows[0]), int(q_rows[1]))
    if hi - lo != q.shape[1]:
        raise ValueError(f"q has {q.shape[1]} rows but q_rows is [{lo}, {hi})")
    f0, f1 = lo // P, -(-hi // P)  # frames the rows touch
    scale = default_scale(D) if scale is None else float(scale)
    if config is None:
        from lvsa.devices import compute_capability
        config = choose_config(D, compute_capability(q.device))
    bm, bn, warps, stages, mode = config
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_dim(name, t)
    if mode == "span" and P < bn:
        mode = "gather"  # a tile may span more than two frames
    if mode == "tma" and (interpreting() or not (k.is_contiguous() and v.is_contiguous())):
        mode = "tiles"
    if out is None:
        out = torch.empty_like(q)
    has_text = text_k is not None and text_k.shape[1] > 0
    if has_text:
        _check_last_dim("text_k", text_k)
        _check_last_dim("text_v", text_v)
        tk, tv, L = text_k, text_v, text_k.shape[1]
    else:
        tk, tv, L = k, v, 0
    tail_n = min(TAIL_BLOCK_N, bn)
    if mode in ("tiles", "tma"):
        t_ptr, t_nfull, t_tok, t_len = plan.tiles(P, bn, tail_n)
    else:
        t_ptr = t_nfull = t_tok = t_len = plan.indptr
    kd, vd = k, v
    if mode == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor(k, [B * S, Hkv * D], [Hkv * D, 1], [bn, D])
        vd = TensorDescriptor(v, [B * S, Hkv * D], [Hkv * D, 1], [bn, D])
    args = (q, k, v, tk, tv, out, kd, vd, plan.indptr, plan.indices,
            t_ptr, t_nfull, t_tok, t_len,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            tk.stride(0), tk.stride(1), tk.stride(2),
            tv.stride(0), tv.stride(1), tv.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            S, H, H // Hkv, P, f0, lo, hi)
    meta = dict(HEAD_DIM=D, BLOCK_N=bn, BLOCK_NT=tail_n, HAS_TEXT=has_text, MODE=MODES[mode],
                num_stages=stages)
    # Query rows: full BLOCK_M tiles in the main launch; when P % BLOCK_M leaves a short
    # remainder (1560 = 12*128 + 24), a narrow second launch covers it instead of a
    # mostly-empty 128-row tile per frame.
    full_tiles, rem = divmod(P, bm)
    bm_tail = max(16, triton.next_power_of_2(rem)) if rem else 0
    if mode == "gather" or not full_tiles or not rem or bm_tail > bm // 2:
        full_tiles, bm_tail = triton.cdiv(P, bm), 0
    _lvsa_fwd[((f1 - f0) * full_tiles, B * H)](*args, full_tiles, 0, L, scale * LOG2E, BLOCK_M=bm,
                                               num_warps=warps, **meta)
    if bm_tail:
        _lvsa_fwd[(f1 - f0, B * H)](*args, 1, full_tiles * bm, L, scale * LOG2E, BLOCK_M=bm_tail,
                                    num_warps=4, **meta)
    return out


class TritonBackend(CudaBackend):
    """Block-sparse flash attention in Triton, frame-granular, text and GQA in-kernel."""

    name = "triton"
    requires = ("triton",)
    install_hint = "pip install lvsa-cuda"
    supports_q_rows = True
    #: auto order on CUDA: after flashinfer (7-13 % faster at every T >= 41 on the H200),
    #: before the reference (1.23-1.30x faster at Wan 1.3B T81/T121/batch 2, 1.11x at
    #: HunyuanVideo T65+text; 3 % slower at Wan 14B T81 and near-dense masks)
    priority = {"cuda": 100}
    settings = (CONFIG_SETTING,)
    description = ("Triton block-sparse flash attention (frame CSR walked as one packed key "
                   "stream; text keys in the same softmax; GQA); compiles in seconds")

    @property
    def compiles(self) -> bool:
        """Triton JIT-compiles each specialisation on first launch (not in the interpreter)."""
        return not interpreting()

    def compile_key(self, problem) -> str:
        cc = problem.compute_capability
        return super().compile_key(problem) + (f" sm_{cc[0]}{cc[1]}" if cc else "")

    def compile_cache_dir(self):
        """Triton's kernel cache: ``TRITON_CACHE_DIR``, else ``$TRITON_HOME/.triton/cache``
        (``TRITON_HOME`` defaults to the home directory)."""
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(
            os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")

    def plan(self, mask: BlockMask, problem) -> TritonPlan:
        device = concrete_device(problem.device)
        plan = plan_for(mask, device)
        if problem.q_rows is not None:
            plan = dataclasses.replace(plan, q_rows=tuple(problem.q_rows))  # tile tables shared
        return plan

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        with device_guard(q.device):
            return block_sparse_attention(plan, q, k, v, text_k, text_v, scale)


@hookimpl
def lvsa_register_backends(register):
    register(TritonBackend())
