"""A CPU stand-in for FlashAttention-4's documented block-sparse forward
(``flash_attn.cute.flash_attn_func`` with ``block_sparse_tensors`` and a ``mask_mod``):
for query tile ``m`` the kernel runs the key tiles ``full_block_idx[b, h, m, :full_block_cnt]``
unmasked and ``mask_block_idx[b, h, m, :mask_block_cnt]`` through ``mask_mod`` (called on the
whole tile, padded rows and keys included, as FA4 does); every other
key tile is skipped; rows/keys past the sequence are masked; the LSE is natural-log
``[B, H, Sq]``; without ``block_sparse_tensors`` it is FA4's dense forward (every key).
The ``mask_mod`` here is the backend's torch twin of its CuTe function
(:func:`lvsa_cuda.fa4_backend.torch_mask_mod`, the same kind and constants), so the
backend's tables, aux tensors and mask_mod constants are what decide the result. The fixture :func:`fake_fa4` installs it."""
from typing import NamedTuple, Optional, Tuple

import pytest
import torch


class StandinBST(NamedTuple):
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: Optional[torch.Tensor] = None
    full_block_idx: Optional[torch.Tensor] = None
    cu_total_m_blocks: Optional[torch.Tensor] = None
    cu_block_idx_offsets: Optional[torch.Tensor] = None
    block_size: Optional[Tuple[int, int]] = None


calls = []


def flash_attn_func(q, k, v, softmax_scale=None, mask_mod=None, aux_tensors=None,
                    block_sparse_tensors=None, return_lse=False, **kw):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    bst = block_sparse_tensors
    if bst is None:  # FA4's dense forward: no block sparsity, no mask, every key
        assert mask_mod is None and aux_tensors is None
        calls.append(dict(dense=True, q=tuple(q.shape), k=tuple(k.shape), scale=softmax_scale))
        return _attend(q, k, v, torch.ones(B, H, Sq, Sk, dtype=torch.bool), softmax_scale, return_lse)
    tm, tn = bst.block_size
    M, N = -(-Sq // tm), -(-Sk // tn)
    for name, t, nd in (("mask_block_cnt", bst.mask_block_cnt, 3), ("mask_block_idx", bst.mask_block_idx, 4),
                        ("full_block_cnt", bst.full_block_cnt, 3), ("full_block_idx", bst.full_block_idx, 4)):
        assert t.ndim == nd and t.dtype == torch.int32, name
        assert t.shape[0] in (1, B) and t.shape[1] in (1, H) and t.shape[2] == M, (name, t.shape, M)
        if nd == 4:
            assert t.shape[3] <= N, name
    calls.append(dict(block_size=(tm, tn), aux=[a.shape for a in aux_tensors]))
    allowed = torch.zeros(B, H, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for m in range(M):
                rows = torch.arange(m * tm, min((m + 1) * tm, Sq))
                pick = lambda t: t[min(b, t.shape[0] - 1), min(h, t.shape[1] - 1), m]  # noqa: E731
                for n in pick(bst.full_block_idx)[:int(pick(bst.full_block_cnt))].tolist():
                    allowed[b, h, rows[0]:rows[-1] + 1, n * tn:min((n + 1) * tn, Sk)] = True
                for n in pick(bst.mask_block_idx)[:int(pick(bst.mask_block_cnt))].tolist():
                    cols = torch.arange(n * tn, min((n + 1) * tn, Sk))
                    # like FA4, the mask_mod sees the whole tile, padded rows and keys included (an
                    # aux table too small for them fails here instead of reading past it on a GPU)
                    tile = mask_mod(torch.arange(m * tm, (m + 1) * tm), torch.arange(n * tn, (n + 1) * tn),
                                    aux_tensors)
                    allowed[b, h, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = tile[:len(rows), :len(cols)]
    return _attend(q, k, v, allowed, softmax_scale, return_lse)


def _attend(q, k, v, allowed, softmax_scale, return_lse):
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.double().repeat_interleave(rep, 2), v.double().repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * softmax_scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)                                   # [B, H, Sq], natural
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv).to(q.dtype)
    return out, (lse.float() if return_lse else None)


@pytest.fixture
def fake_fa4(monkeypatch):
    from lvsa_cuda import fa4_backend as fa

    calls.clear()
    monkeypatch.setattr(fa, "kernel", lambda: (flash_attn_func, StandinBST, fa.torch_mask_mod))
    monkeypatch.setattr(fa, "dense_func", lambda: flash_attn_func)
    monkeypatch.setattr(fa, "_import_error", lambda: None)
    monkeypatch.setattr(fa.FA4Backend, "missing_packages", lambda self: [])
    yield calls
