"""The ``ascend`` backend: lvsa block-sparse attention on Huawei Ascend NPUs (Atlas A2/A3)
through ``torch_npu.npu_fusion_attention``.

Decomposition
-------------
Query frame ``f`` attends to ``G ∪ [lo_f, hi_f]`` (globals plus its window). The keys of
every query are split into disjoint sets, each computed by the fused op with
``atten_mask=None`` (so the op computes its full matrix; ``sparse_mode`` and
``pre_tockens``/``next_tockens`` play no part), and the partial results are merged
exactly by log-sum-exp, ``lse = softmax_max[..., 0] + log(softmax_sum[..., 0])``:

1. **globals** — every query against the K/V of the global frames, gathered into
   ``[B, |G|*P, Hkv, D]``: dense ``BSND`` calls (the plain K/V when every frame is global,
   i.e. a dense mask).
2. **window** — for each query frame whose window holds frames that are not global,
   ``R_f = [lo_f, hi_f] \\ G``: one varlen sequence of ``P`` queries against ``R_f``'s K/V.
   Sequences of all ``(batch, frame)`` pairs are packed into ``TND`` tensors (K/V
   frames gathered into a packed buffer) with **cumulative** ``actual_seq_qlen`` /
   ``actual_seq_kvlen``. Frames with an empty ``R_f`` are simply not packed, so no
   query row is ever fully masked (a TND rule).
3. **text** — every query against the text K/V: dense ``BSND``.

No mask tensor exists at any point (never an S×S mask, never a token band standing in
for frame blocks). GQA is passed to the op whole (``Nq/Nkv`` heads). The accumulator is
float32 ``[B, S, H, D]`` plus ``[B, S, H]`` LSE; the result is cast to ``q``'s dtype.

Documented op limits are met by splitting work: heads per call ≤ 256 (whole GQA groups,
or a slice of one group against its single K/V head), query tokens per call ≤ 1M, key
tokens per dense call ≤ 1M (chunks merged by LSE), ≤ 2048 sequences per varlen call,
and packed window K/V per varlen call ≤ :attr:`AscendBackend.window_kv_tokens` tokens
(which bounds the gather buffer). What cannot be split — head dim above 768, a
``seq_len`` that is not ``T*P``, non-whole GQA — is a :meth:`supports` reason.

The softmax ``scale`` is always passed (the op's default is 1.0, not ``1/sqrt(D)``).
Device memory and synchronisation go through ``torch.npu`` (see :mod:`lvsa.devices`);
collectives under context parallelism use ``hccl``.

This is the code that runs on a 910B. It has been tested only against a CPU emulation
of the documented op semantics (``tests/ascend_emulation.py``), not on Ascend hardware.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from lvsa.backend import Backend, Problem
from lvsa.hookspecs import hookimpl
from lvsa.mask import BlockMask, token_ranges
from lvsa.ops import default_scale, merge_lse

#: documented limits of ``npu_fusion_attention``
MAX_HEADS = 256
MAX_HEAD_DIM = 768
MAX_SEQ = 1 << 20
MAX_VARLEN_SEQS = 2048


def head_slices(H: int, Hkv: int, limit: int = MAX_HEADS) -> List[Tuple[int, int, int, int]]:
    """``(q_lo, q_hi, kv_lo, kv_hi)`` head ranges per call, each ≤ ``limit`` query heads
    with a whole query/K-V head ratio (query head ``h`` reads K/V head ``h // (H/Hkv)``)."""
    rep = H // Hkv
    if rep <= limit:
        g = max(1, limit // rep)
        return [(j * rep, min(j + g, Hkv) * rep, j, min(j + g, Hkv)) for j in range(0, Hkv, g)]
    return [(j * rep + s, j * rep + min(s + limit, rep), j, j + 1)
            for j in range(Hkv) for s in range(0, rep, limit)]


@dataclass
class WindowChunk:
    """One varlen call: packed query frames and packed K/V frames (indices into the
    ``[B*T, P, ...]`` view) with cumulative token counts."""

    q_rows: torch.Tensor  # [n] int64, b*T + f
    kv_rows: torch.Tensor  # [m] int64, b*T + r
    cum_q: List[int]
    cum_kv: List[int]


@dataclass
class AscendPlan:
    """Frame-level plan of one :class:`BlockMask` (built once per mask).

    ``window_seqs`` lists ``(f, R_f)`` for each query frame with a non-empty
    non-global window part; chunks per ``(B, P, device)`` are built on first use.
    """

    num_frames: int
    globals_: Tuple[int, ...]
    window_seqs: Tuple[Tuple[int, Tuple[int, ...]], ...]
    window_kv_tokens: int
    max_seqs: int = MAX_VARLEN_SEQS
    _chunks: Dict[tuple, List[WindowChunk]] = field(default_factory=dict, repr=False)
    _gidx: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, mask: BlockMask, window_kv_tokens: int, max_seqs: int = MAX_VARLEN_SEQS):
        g = tuple(mask.globals)
        gset = set(g)
        seqs = []
        if mask.windows is not None:
            for f, (lo, hi) in enumerate(mask.windows):
                rest = tuple(r for r in range(lo, hi + 1) if r not in gset)
                if rest:
                    seqs.append((f, rest))
        return cls(mask.num_frames, g, tuple(seqs), window_kv_tokens, max_seqs)

    @property
    def all_global(self) -> bool:
        return len(self.globals_) == self.num_frames

    def global_index(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._gidx:
            self._gidx[key] = torch.tensor(self.globals_, dtype=torch.long, device=device)
        return self._gidx[key]

    def chunks(self, B: int, P: int, device) -> List[WindowChunk]:
        """Greedy packing of the ``(b, f)`` sequences into varlen calls."""
        key = (B, P, str(device))
        hit = self._chunks.get(key)
        if hit is not None:
            return hit
        T = self.num_frames
        out: List[WindowChunk] = []
        q_rows: List[int] = []
        kv_rows: List[int] = []
        cum_kv: List[int] = []

        def flush():
            if q_rows:
                out.append(WindowChunk(torch.tensor(q_rows, dtype=torch.long, device=device),
                                       torch.tensor(kv_rows, dtype=torch.long, device=device),
                                       [P * (i + 1) for i in range(len(q_rows))], list(cum_kv)))
            q_rows.clear()
            kv_rows.clear()
            cum_kv.clear()

        for b in range(B):
            for f, rest in self.window_seqs:
                if q_rows and (len(q_rows) >= self.max_seqs
                               or (len(q_rows) + 1) * P > MAX_SEQ
                               or (len(kv_rows) + len(rest)) * P > self.window_kv_tokens):
                    flush()
                q_rows.append(b * T + f)
                kv_rows.extend(b * T + r for r in rest)
                cum_kv.append(len(kv_rows) * P)
        flush()
        self._chunks[key] = out
        return out


def _lse(softmax_max: torch.Tensor, softmax_sum: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE of the scaled logits from the op's trailing-8 statistics."""
    return softmax_max[..., 0] + torch.log(softmax_sum[..., 0])


class AscendBackend(Backend):
    """Block-sparse attention with ``torch_npu.npu_fusion_attention`` (see module docs)."""

    name = "ascend"
    devices = ("npu",)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    max_head_dim = MAX_HEAD_DIM
    supports_gqa = True
    supports_text = True
    requires = ("torch_npu",)
    install_hint = "pip install torch-npu"
    priority = {"npu": 100}
    #: (atol, rtol) against float64 attention (``python -m lvsa.testing ascend``): the op
    #: computes in float32; globals, windows and text merge by LSE in float32
    tolerances = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2),
                  torch.float16: (2e-3, 2e-3)}
    description = ("torch_npu npu_fusion_attention: dense globals (BSND) + packed varlen "
                   "windows (TND) + text, merged by LSE; Atlas A2/A3")
    #: packed window K/V tokens per varlen call (bounds the gather buffer:
    #: 256K tokens x 40 heads x 128 x bf16 = 2.5 GiB each for K and V)
    window_kv_tokens: int = 1 << 18
    #: sequences per varlen call (the op allows 2K)
    max_varlen_seqs: int = MAX_VARLEN_SEQS

    # ------------------------------------------------------------ capabilities
    def availability_reasons(self) -> List[str]:
        reasons = super().availability_reasons()
        if reasons:  # torch_npu not installed: the package reason says it all
            return reasons
        from lvsa.devices import npu_status

        st = npu_status()
        if not st.available:
            return [st.reason or "no Ascend NPU is available"]
        mod = sys.modules.get("torch_npu")
        if mod is not None and not hasattr(mod, "npu_fusion_attention"):
            ver = getattr(mod, "__version__", "?")
            return [f"torch_npu {ver} has no npu_fusion_attention (upgrade torch-npu)"]
        return []

    def extra_reasons(self, problem: Problem) -> List[str]:
        r = []
        if problem.head_dim < 1:
            r.append(f"head_dim is {problem.head_dim}, npu_fusion_attention needs 1..{MAX_HEAD_DIM}")
        if problem.num_kv_heads < 1 or problem.num_heads % problem.num_kv_heads:
            r.append(f"{problem.num_heads} query heads over {problem.num_kv_heads} K/V heads is "
                     "not a whole GQA ratio")
        if problem.T < 1 or problem.seq_len != problem.T * problem.P:
            r.append(f"seq_len {problem.seq_len} is not T*P (T={problem.T}, P={problem.P})")
        return r

    # ------------------------------------------------------------- execution
    def plan(self, mask: BlockMask, problem: Optional[Problem] = None) -> AscendPlan:
        return AscendPlan.build(mask, self.window_kv_tokens, self.max_varlen_seqs)

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        """See :meth:`lvsa.backend.Backend.run`; ``plan`` is the :class:`AscendPlan` from
        :meth:`plan`."""
        if not isinstance(plan, AscendPlan):
            raise TypeError(f"ascend.run() takes the AscendPlan from ascend.plan(mask, problem), "
                            f"got {type(plan).__name__}")
        npu = importlib.import_module("torch_npu")
        B, S, H, D = q.shape
        Hkv = k.shape[2]
        T = plan.num_frames
        if S % T:
            raise ValueError(f"sequence length {S} is not a multiple of T={T}")
        P = S // T
        scale = default_scale(D) if scale is None else float(scale)

        acc = None
        if plan.globals_:
            if plan.all_global:
                kg, vg = k, v
            elif len(token_ranges(plan.globals_)) == 1:
                a, b = plan.globals_[0] * P, (plan.globals_[-1] + 1) * P
                kg, vg = k[:, a:b], v[:, a:b]
            else:
                idx = plan.global_index(q.device)
                G = len(plan.globals_)
                kg = k.view(B, T, P, Hkv, D).index_select(1, idx).reshape(B, G * P, Hkv, D)
                vg = v.view(B, T, P, Hkv, D).index_select(1, idx).reshape(B, G * P, Hkv, D)
            acc = _dense(npu, q, kg, vg, scale)
        if text_k is not None and text_k.shape[1] > 0:
            part = _dense(npu, q, text_k, text_v, scale)
            acc = part if acc is None else merge_lse(*acc, *part)
        if acc is None:
            acc = (torch.zeros(B, S, H, D, dtype=torch.float32, device=q.device),
                   torch.full((B, S, H), float("-inf"), device=q.device))
        acc_out, acc_lse = acc[0].float().contiguous(), acc[1].contiguous()

        if plan.window_seqs:
            out_f = acc_out.view(B * T, P, H, D)
            lse_f = acc_lse.view(B * T, P, H)
            qf = q.reshape(B * T, P, H, D)
            kf = k.reshape(B * T, P, Hkv, D)
            vf = v.reshape(B * T, P, Hkv, D)
            for ch in plan.chunks(B, P, q.device):
                n = ch.q_rows.numel()
                qp = qf.index_select(0, ch.q_rows).reshape(n * P, H, D)
                kp = kf.index_select(0, ch.kv_rows).reshape(-1, Hkv, D)
                vp = vf.index_select(0, ch.kv_rows).reshape(-1, Hkv, D)
                o, lse = _call(npu, "TND", qp, kp, vp, scale,
                               actual_seq_qlen=ch.cum_q, actual_seq_kvlen=ch.cum_kv)
                mo, ml = merge_lse(out_f.index_select(0, ch.q_rows),
                                   lse_f.index_select(0, ch.q_rows),
                                   o.view(n, P, H, D), lse.view(n, P, H))
                out_f.index_copy_(0, ch.q_rows, mo)
                lse_f.index_copy_(0, ch.q_rows, ml)
        return acc_out.to(q.dtype)


def _call(npu, layout: str, q, k, v, scale: float, **kw):
    """One logical call split over head groups. ``BSND``: ``q [B,Sq,H,D]``; ``TND``:
    ``q [Tq,H,D]``. Returns ``(out like q, lse [B,Sq,H] / [Tq,H] float32)``."""
    H, Hkv = q.shape[-2], k.shape[-2]
    slices = head_slices(H, Hkv)
    outs, lses = [], []
    for qa, qb, ka, kb in slices:
        qs = q[..., qa:qb, :] if len(slices) > 1 else q
        ks = k[..., ka:kb, :] if len(slices) > 1 else k
        vs = v[..., ka:kb, :] if len(slices) > 1 else v
        res = npu.npu_fusion_attention(
            qs.contiguous(), ks.contiguous(), vs.contiguous(), qb - qa, layout,
            scale=scale, keep_prob=1.0, **kw)
        out, smax, ssum = res[0], res[1], res[2]
        lse = _lse(smax, ssum)  # BSND: [B,N,Sq]; TND: [N,T]
        lses.append(lse.transpose(-1, -2))
        outs.append(out)
    if len(slices) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _dense(npu, q, k, v, scale: float):
    """Every query of ``q [B,Sq,H,D]`` against all of ``k/v [B,Sk,Hkv,D]`` (BSND), split at
    the op's 1M-token sequence limit. Returns ``(out float32 [B,Sq,H,D], lse [B,Sq,H])``."""
    Sq, Sk = q.shape[1], k.shape[1]
    if Sq <= MAX_SEQ and Sk <= MAX_SEQ:
        o, lse = _call(npu, "BSND", q, k, v, scale)
        return o.float(), lse
    outs, lses = [], []
    for qa in range(0, Sq, MAX_SEQ):
        acc = None
        for ka in range(0, Sk, MAX_SEQ):
            o, lse = _call(npu, "BSND", q[:, qa:qa + MAX_SEQ], k[:, ka:ka + MAX_SEQ],
                           v[:, ka:ka + MAX_SEQ], scale)
            acc = (o.float(), lse) if acc is None else merge_lse(*acc, o, lse)
        outs.append(acc[0])
        lses.append(acc[1])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


@hookimpl
def lvsa_register_backends(register):
    register(AscendBackend())
