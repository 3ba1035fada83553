"""A CPU stand-in for FlashInfer's documented ``BlockSparseAttentionWrapper`` semantics
(block row i = query rows [i*R, (i+1)*R), block column j = key rows [j*C, (j+1)*C);
``run(q [M,Hq,D], k/v [N,Hkv,D])`` -> out, base-2 LSE), so the ``flashinfer`` backend's
plan/run is tested without a GPU. The fixture :func:`fake_flashinfer` installs it as the
``flashinfer`` module."""
import math
import sys

import pytest
import torch


class FakeBSRWrapper:
    plans = 0

    def __init__(self, workspace, backend="auto"):
        assert workspace.dtype == torch.uint8
        self.args = None

    def plan(self, indptr, indices, M, N, R, C, num_qo_heads, num_kv_heads, head_dim, sm_scale=None,
             q_data_type=None, o_data_type=None, **kw):
        FakeBSRWrapper.plans += 1
        assert M % R == 0 and N % C == 0 and indptr.numel() == M // R + 1
        self.args = (indptr.tolist(), indices.tolist(), M, N, R, C, num_qo_heads, num_kv_heads, sm_scale)

    def run(self, q, k, v, return_lse=False):
        indptr, indices, M, N, R, C, Hq, Hkv, scale = self.args
        assert q.shape[0] == M and k.shape[0] == N and q.shape[1] == Hq and k.shape[1] == Hkv
        # the real kernel reads K and V with one page stride (FlashInfer refuses otherwise:
        # "K and V must have same page stride for sparse attention")
        if k.stride() != v.stride():
            raise RuntimeError(f"K and V must have same page stride for sparse attention "
                               f"({k.stride()} vs. {v.stride()})")
        allowed = torch.zeros(M, N, dtype=torch.bool)
        for i in range(M // R):
            for j in indices[indptr[i]:indptr[i + 1]]:
                allowed[i * R:(i + 1) * R, j * C:(j + 1) * C] = True
        rep = Hq // Hkv
        kk, vv = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
        s = torch.einsum("mhd,nhd->hmn", q.float(), kk) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)                       # [H, M], natural
        out = torch.einsum("hmn,nhd->mhd", torch.softmax(s, -1), vv).to(q.dtype)
        return (out, (lse / math.log(2)).t().contiguous()) if return_lse else out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import types
    mod = types.ModuleType("flashinfer")
    mod.BlockSparseAttentionWrapper = FakeBSRWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    FakeBSRWrapper.plans = 0
    yield mod
    from lvsa_cuda import flashinfer_backend as fb
    fb._workspaces.clear()


