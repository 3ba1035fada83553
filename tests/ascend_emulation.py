"""A CPU emulation of ``torch_npu`` for the ``ascend`` backend's tests.

No Ascend NPU is reachable in CI, so the backend is checked against this module,
which implements ``torch_npu.npu_fusion_attention`` exactly as
``shared/reference/ascend-facts.md`` documents it:

* layouts BSH ``[B,S,N*D]``, SBH ``[S,B,N*D]``, BSND ``[B,S,N,D]``, BNSD ``[B,N,S,D]``
  and TND ``[T,N,D]`` (varlen, both ``actual_seq_*`` required, **cumulative** Python
  lists; an empty sequence repeats the previous value);
* ``s = (Q @ K^T) * scale`` with ``scale`` defaulting to **1.0**; ``atten_mask``
  bool/uint8 with **1/True = masked out**, masked logits filled with -40000;
  ``max = rowmax(s)``, ``sum = Σ exp(s - max)``, ``out = softmax(s) @ V`` computed in
  float32 and returned in the input dtype
  (Ascend's golden CPU tests add ``mask * -40000`` and zero the masked probabilities;
  the two readings differ only on a fully masked row, which the backend never
  produces: it passes no mask at all);
* ``softmax_max`` / ``softmax_sum`` float32 ``[B,N,Sq,8]`` (the value repeated 8 times),
  in TND ``[N,T,8]`` (default) or ``[T,N,8]`` with ``softmax_layout="TND"``;
* GQA when ``Nq / Nkv`` is whole (query head ``h`` reads K/V head ``h // (Nq/Nkv)``);
* limits raise: D 1–768, heads 1–256, S up to 1M, batch up to 2M (non-varlen) or 2K
  sequences (varlen), equal fp16/bf16/fp32 dtypes, TND masks only ``[maxSq, maxSkv]``,
  and in TND no query row may be fully masked (nor a non-empty query sequence meet an
  empty key sequence).

What the facts do not pin down is refused (``NotImplementedError``) rather than
guessed, so the backend cannot come to depend on it: dropout (``keep_prob != 1``),
``pse``, ``padding_mask``, ``prefix``, ``sink``, and any ``sparse_mode`` other than 0 or
non-default ``pre_tockens``/``next_tockens`` together with a mask. (With
``atten_mask=None`` the facts say ``sparse_mode`` and pre/next are ignored; so are they
here.)

Every call is appended to :data:`CALLS` (layout, shapes, mask shape, lengths) so the
tests can check *how* the backend uses the op, not only what it returns.

The fixture :func:`emulated_npu` installs this module as ``torch_npu`` in
``sys.modules``, a fake ``torch.npu`` device module, and refreshes
``lvsa.devices.npu_status``; it undoes all of that (and refreshes again) afterwards.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from typing import List

import pytest
import torch

MAX_HEAD_DIM = 768
MAX_HEADS = 256
MAX_SEQ = 1 << 20
MAX_BATCH = 2 * 1024 * 1024
MAX_VARLEN_SEQS = 2048
DEFAULT_TOCKENS = 2147483647
MASK_FILL = -40000.0
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: one dict per call, appended by :func:`npu_fusion_attention`
CALLS: List[dict] = []

__version__ = "2.5.1.post1+lvsa.emulated"


# ------------------------------------------------------------------ helpers
def _to_bnsd(t, layout, head_num_or_d, is_query):
    """Layout → ``[B, N, S, D]`` (for BSH/SBH, ``head_num_or_d`` is heads for the query
    and head dim for K/V)."""
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout in ("BSH", "SBH"):
        if t.dim() != 3:
            raise ValueError(f"{layout} tensors must be 3-D, got {tuple(t.shape)}")
        if layout == "SBH":
            t = t.transpose(0, 1)
        B, S, HD = t.shape
        if is_query:
            if HD % head_num_or_d:
                raise ValueError(f"hidden size {HD} is not a multiple of head_num {head_num_or_d}")
            D = HD // head_num_or_d
        else:
            D = head_num_or_d
            if HD % D:
                raise ValueError(f"K/V hidden size {HD} is not a multiple of head dim {D}")
        return t.reshape(B, S, HD // D, D).transpose(1, 2)
    raise AssertionError(layout)


def _from_bnsd(t, layout):
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    B, N, S, D = t.shape
    t = t.transpose(1, 2).reshape(B, S, N * D)
    return t.transpose(0, 1) if layout == "SBH" else t


def _core(q, k, v, scale, mask):
    """``q [N,Sq,D]``, ``k/v [Nkv,Skv,D]`` (or with a leading batch dim), mask
    broadcastable to ``[..., N, Sq, Skv]`` (True = masked). float32 math."""
    rep = q.shape[-3] // k.shape[-3]
    if rep != 1:
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(mask, MASK_FILL)
    mx = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - mx)
    sm = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e / sm, v.float())
    return out, mx.squeeze(-1), sm.squeeze(-1)


def _check_lengths(name, lens, total):
    if not isinstance(lens, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                             for x in lens):
        raise TypeError(f"{name} must be a Python list[int] (cumulative), got {type(lens).__name__}")
    if not lens:
        raise ValueError(f"{name} is empty")
    prev = 0
    for x in lens:
        if x < prev:
            raise ValueError(f"{name} must be cumulative (non-decreasing): {lens[:8]}...")
        prev = x
    if lens[-1] != total:
        raise ValueError(f"{name} ends at {lens[-1]} but the packed tensor holds {total} tokens")


# ---------------------------------------------------------------- the op
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=DEFAULT_TOCKENS,
                         next_tockens=DEFAULT_TOCKENS, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """Emulated ``torch_npu.npu_fusion_attention`` (see the module docstring).

    Returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``.
    """
    layout = input_layout
    if layout not in LAYOUTS:
        raise ValueError(f"input_layout {layout!r} is not one of {LAYOUTS}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not fp16/bf16/fp32")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError("query, key and value must have one dtype")
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    for name, x in (("pse", pse), ("padding_mask", padding_mask), ("prefix", prefix), ("sink", sink)):
        if x is not None:
            raise NotImplementedError(f"the emulation does not model {name}")
    if keep_prob != 1.0:
        raise NotImplementedError("the emulation does not model dropout (keep_prob != 1)")
    if softmax_layout not in ("", "TND"):
        raise ValueError(f"softmax_layout {softmax_layout!r} is not '' or 'TND'")
    if softmax_layout and layout != "TND":
        raise ValueError("softmax_layout applies to the TND layout only")
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"atten_mask must be bool or uint8, got {atten_mask.dtype}")
        if sparse_mode != 0 or pre_tockens != DEFAULT_TOCKENS or next_tockens != DEFAULT_TOCKENS:
            raise NotImplementedError("the emulation models sparse_mode=0 with default "
                                      "pre_tockens/next_tockens only")
        atten_mask = atten_mask.bool()
    if not isinstance(scale, (int, float)):
        raise TypeError("scale must be a Python number")
    scale = float(scale)

    if layout == "TND":
        return _tnd(query, key, value, head_num, atten_mask, scale, actual_seq_qlen,
                    actual_seq_kvlen, softmax_layout)

    if query.dim() not in (3, 4):
        raise ValueError(f"query must be 3-D or 4-D for {layout}")
    qb = _to_bnsd(query, layout, head_num, True)
    D = qb.shape[-1]
    kb = _to_bnsd(key, layout, D, False)
    vb = _to_bnsd(value, layout, D, False)
    B, N, Sq, _ = qb.shape
    Nkv, Skv = kb.shape[1], kb.shape[2]
    _check_limits(N, Nkv, D, kb.shape[-1], head_num)
    if kb.shape[0] != B:
        raise ValueError(f"query batch {B} and key batch {kb.shape[0]} differ")
    if not (1 <= B <= MAX_BATCH):
        raise ValueError(f"batch {B} outside 1..{MAX_BATCH}")
    if not (1 <= Sq <= MAX_SEQ and 1 <= Skv <= MAX_SEQ):
        raise ValueError(f"sequence lengths {Sq}/{Skv} outside 1..{MAX_SEQ}")
    mask = None
    if atten_mask is not None:
        ok = {(B, N, Sq, Skv), (B, 1, Sq, Skv), (1, 1, Sq, Skv), (Sq, Skv)}
        if tuple(atten_mask.shape) not in ok:
            raise ValueError(f"atten_mask shape {tuple(atten_mask.shape)} is not BNSS, B1SS, 11SS "
                             f"or SS for B={B} N={N} Sq={Sq} Skv={Skv}")
        mask = atten_mask
    out, mx, sm = _core(qb, kb, vb, scale, mask)
    CALLS.append(dict(layout=layout, q_shape=tuple(query.shape), k_shape=tuple(key.shape),
                      atten_mask=None if mask is None else tuple(mask.shape), scale=scale,
                      head_num=head_num, num_seqs=B))
    return (_from_bnsd(out.to(query.dtype), layout).contiguous(), _eight(mx), _eight(sm),
            torch.empty(0, dtype=query.dtype), 0, 0, 0)


def _eight(x):
    return x.float().unsqueeze(-1).expand(*x.shape, 8).contiguous()


def _check_limits(N, Nkv, D, Dk, head_num):
    if head_num != N:
        raise ValueError(f"head_num {head_num} != query heads {N}")
    if not (1 <= N <= MAX_HEADS):
        raise ValueError(f"query heads {N} outside 1..{MAX_HEADS}")
    if Nkv < 1 or N % Nkv:
        raise ValueError(f"GQA needs whole Nq/Nkv, got {N}/{Nkv}")
    if not (1 <= D <= MAX_HEAD_DIM):
        raise ValueError(f"head dim {D} outside 1..{MAX_HEAD_DIM}")
    if Dk != D:
        raise ValueError(f"query head dim {D} and key head dim {Dk} differ")


def _tnd(query, key, value, head_num, atten_mask, scale, qlen, kvlen, softmax_layout):
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError("TND tensors must be 3-D [T, N, D]")
    Tq, N, D = query.shape
    Tk, Nkv, Dk = key.shape
    _check_limits(N, Nkv, D, Dk, head_num)
    if qlen is None or kvlen is None:
        raise ValueError("TND needs both actual_seq_qlen and actual_seq_kvlen")
    _check_lengths("actual_seq_qlen", qlen, Tq)
    _check_lengths("actual_seq_kvlen", kvlen, Tk)
    if len(qlen) != len(kvlen):
        raise ValueError(f"{len(qlen)} query sequences but {len(kvlen)} key sequences")
    if len(qlen) > MAX_VARLEN_SEQS:
        raise ValueError(f"{len(qlen)} sequences in one varlen call; at most {MAX_VARLEN_SEQS}")
    bounds_q = [0] + qlen
    bounds_k = [0] + kvlen
    sq_max = max(b - a for a, b in zip(bounds_q, bounds_q[1:]))
    sk_max = max(b - a for a, b in zip(bounds_k, bounds_k[1:]))
    if max(sq_max, sk_max) > MAX_SEQ:
        raise ValueError(f"a sequence longer than {MAX_SEQ}")
    if atten_mask is not None:
        if atten_mask.dim() != 2:
            raise ValueError("in TND atten_mask must be SS [maxSq, maxSkv], shared by all sequences")
        if atten_mask.shape[0] < sq_max or atten_mask.shape[1] < sk_max:
            raise ValueError(f"TND atten_mask {tuple(atten_mask.shape)} is smaller than "
                             f"[maxSq={sq_max}, maxSkv={sk_max}]")
    out = torch.zeros(Tq, N, D, dtype=torch.float32)
    mx = torch.zeros(N, Tq)
    sm = torch.zeros(N, Tq)
    for i in range(len(qlen)):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            raise ValueError(f"sequence {i} has {q1 - q0} queries and no keys: fully masked rows "
                             "are not allowed in TND")
        m = None
        if atten_mask is not None:
            m = atten_mask[: q1 - q0, : k1 - k0]
            if bool(m.all(dim=-1).any()):
                raise ValueError(f"sequence {i}: a fully masked query row (not allowed in TND)")
        o, a, s = _core(query[q0:q1].transpose(0, 1), key[k0:k1].transpose(0, 1),
                        value[k0:k1].transpose(0, 1), scale, m)
        out[q0:q1] = o.transpose(0, 1)
        mx[:, q0:q1] = a
        sm[:, q0:q1] = s
    CALLS.append(dict(layout="TND", q_shape=tuple(query.shape), k_shape=tuple(key.shape),
                      atten_mask=None if atten_mask is None else tuple(atten_mask.shape),
                      scale=scale, head_num=head_num, num_seqs=len(qlen),
                      actual_seq_qlen=list(qlen), actual_seq_kvlen=list(kvlen)))
    if softmax_layout == "TND":
        mx, sm = mx.t(), sm.t()
    return (out.to(query.dtype), _eight(mx), _eight(sm), torch.empty(0, dtype=query.dtype), 0, 0, 0)


# ------------------------------------------------------------ the device
def make_torch_npu_device(device_count: int = 1, name: str = "Ascend910B1"):
    """A stand-in for the ``torch.npu`` module that ``import torch_npu`` installs."""
    npu = types.ModuleType("torch.npu")
    npu.is_available = lambda: device_count > 0
    npu.device_count = lambda: device_count
    npu.get_device_name = lambda i=0: name
    npu.mem_get_info = lambda i=0: (60 * 2**30, 64 * 2**30)
    npu.current_device = lambda: 0
    npu.synchronize = lambda device=None: None
    npu.memory_allocated = lambda device=None: 3 * 2**30
    npu.memory_reserved = lambda device=None: 4 * 2**30
    npu.max_memory_allocated = lambda device=None: 5 * 2**30
    npu.reset_peak_memory_stats = lambda device=None: None
    return npu


def make_module(device_count: int = 1, name: str = "Ascend910B1") -> types.ModuleType:
    """This emulation as a fresh module object named ``torch_npu``."""
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = __version__
    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu = make_torch_npu_device(device_count, name)
    return mod


@contextlib.contextmanager
def installed(device_count: int = 1):
    """Install the emulated ``torch_npu`` (and ``torch.npu``) for the ``with`` block."""
    import lvsa.devices as devices

    mod = make_module(device_count)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch_npu", mod)
        mp.setattr(torch, "npu", mod.npu, raising=False)
        devices.npu_status(refresh=True)
        CALLS.clear()
        try:
            yield mod
        finally:
            CALLS.clear()
    devices.npu_status(refresh=True)


@pytest.fixture
def emulated_npu():
    """The emulated ``torch_npu`` with one visible NPU."""
    with installed(device_count=1) as mod:
        yield mod


@pytest.fixture
def emulated_npu_no_device():
    """The emulated ``torch_npu`` importing fine but seeing no NPU."""
    with installed(device_count=0) as mod:
        yield mod
