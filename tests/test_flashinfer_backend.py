"""CPU-checkable parts of the flashinfer backend: the block-diagonal CSR over batch x
frames, the base-2 LSE convention, and the reasons it gives where it cannot run."""
import math
import sys

import pytest
import torch

from lvsa.backend import Problem
from lvsa.ops import attention_lse, merge_lse
from lvsa.schedule import plan_schedule
from lvsa_cuda import flashinfer_backend as fb


def test_batched_csr_is_block_diagonal():
    mask = plan_schedule(9, W=1, n=1, reference=4).mask(1)
    T, nnz = mask.num_frames, mask.nnz()
    indptr, indices = fb.batched_csr(mask, 3)
    assert len(indptr) == 3 * T + 1 and indptr[-1] == 3 * nnz == len(indices)
    for b in range(3):
        for f in range(T):
            row = b * T + f
            cols = indices[indptr[row]:indptr[row + 1]]
            assert cols == [b * T + c for c in mask.attended(f)]
    assert fb.batched_csr(mask, 1) == (list(mask.indptr), list(mask.indices))


def test_batched_csr_matches_token_level_mask_on_flattened_batch():
    """With q/k viewed as [B*S, H, D] and one block per frame, the CSR's token-level
    picture is block-diagonal over the batch: batch b sees only its own keys."""
    mask = plan_schedule(5, W=1, n=1, reference=2).mask(0)
    B, T, P = 2, mask.num_frames, 3
    indptr, indices = fb.batched_csr(mask, B)
    dense = torch.zeros(B * T * P, B * T * P, dtype=torch.bool)
    for r in range(B * T):
        for c in indices[indptr[r]:indptr[r + 1]]:
            dense[r * P:(r + 1) * P, c * P:(c + 1) * P] = True
    tok = mask.to_dense("token", tokens_per_frame=P)
    want = torch.block_diag(tok, tok)
    assert torch.equal(dense, want)


def test_lse_base2_conversion_and_exact_merge():
    """FlashInfer's LSE is base 2: converting it gives the natural LSE that merges a
    sparse part and a text part exactly."""
    torch.manual_seed(0)
    B, S, H, D, L = 1, 10, 2, 16, 5
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    tk, tv = (torch.randn(B, L, H, D, dtype=torch.float64) for _ in range(2))
    scale = 1 / math.sqrt(D)
    o1, lse1 = attention_lse(q, k, v, scale)
    o2, lse2 = attention_lse(q, tk, tv, scale)
    base2 = fb.natural_to_lse2(lse1.double())
    # base-2 definition: log2(sum 2^(x * log2 e)) of the scaled logits
    s = torch.einsum("bshd,bthd->bsht", q, k) * scale
    assert torch.allclose(base2, torch.log2(torch.exp2(s * math.log2(math.e)).sum(-1)), atol=1e-5)
    assert torch.allclose(fb.lse2_to_natural(base2), lse1.double())
    merged, _ = merge_lse(o1, fb.lse2_to_natural(base2), o2, lse2)
    full, _ = attention_lse(q, torch.cat([k, tk], 1), torch.cat([v, tv], 1), scale)
    assert torch.allclose(merged.double(), full.double(), atol=1e-5)


from cuda_problems import ROW_CASES, h200_problem as _problem, query_rows_case  # noqa: E402


def test_reasons_when_package_missing(monkeypatch):
    be = fb.FlashInferBackend()
    monkeypatch.setattr(be, "missing_packages", lambda: ["flashinfer"])
    r = be.not_supported_reasons(_problem())
    assert any("package 'flashinfer' is not installed (pip install lvsa-cuda[flashinfer])" in x
               for x in r)


def test_reasons_when_import_fails(monkeypatch):
    be = fb.FlashInferBackend()
    monkeypatch.setattr(be, "missing_packages", lambda: [])
    monkeypatch.setattr(fb, "_import_error", lambda: "ImportError: libcudart.so.13 not found")
    r = be.not_supported_reasons(_problem())
    assert r == ["flashinfer is installed but fails to import (ImportError: libcudart.so.13 not found)"]


def test_reasons_for_gpu_dtype_device(monkeypatch):
    be = fb.FlashInferBackend()
    monkeypatch.setattr(be, "missing_packages", lambda: [])
    monkeypatch.setattr(fb, "_import_error", lambda: None)
    assert be.not_supported_reasons(_problem()) == []
    assert be.not_supported_reasons(_problem(num_kv_heads=4)) == []  # GQA
    text = " | ".join(be.not_supported_reasons(_problem(device_kind="cpu", dtype=torch.float32, head_dim=80,
                                           compute_capability=None)))
    assert "device is cpu" in text and "dtype is float32" in text and "head_dim is 80" in text
    old = " | ".join(be.not_supported_reasons(_problem(compute_capability=(7, 5))))
    assert "compute capability is 7.5, needs >= 8.0" in old


def test_supports_without_flashinfer_here():
    """On a machine without flashinfer (CI) the backend refuses with a reason instead of
    failing to import."""
    be = fb.FlashInferBackend()
    reasons = be.not_supported_reasons(_problem(device_kind="cpu", compute_capability=None))
    assert any("device is cpu" in r for r in reasons)  # a CPU problem is refused in any case
    if be.missing_packages() or fb._import_error() is not None:
        assert any("flashinfer" in r for r in be.not_supported_reasons(_problem()))


def test_one_workspace_per_device():
    a = fb.workspace(torch.device("cpu"))
    b = fb.workspace("cpu")
    assert a is b and a.dtype == torch.uint8
    assert a.numel() == fb.DEFAULT_WORKSPACE_MB * 2**20
    fb._workspaces.clear()


# The backend's plan/run on the CPU against a stand-in for FlashInfer's documented
# BlockSparseAttentionWrapper (tests/flashinfer_standin.py).
from flashinfer_standin import FakeBSRWrapper as _FakeBSRWrapper, fake_flashinfer  # noqa: E402,F401


@pytest.mark.parametrize("B,H,Hkv,L", [(2, 4, 2, 5), (1, 2, 2, 0), (2, 2, 1, 0)])
def test_plan_and_run_against_the_reference(fake_flashinfer, B, H, Hkv, L):
    from lvsa.backends.reference import ReferenceBackend
    T, P, D = 7, 12, 16
    mask = plan_schedule(T, 1, 1, 3).mask(1)
    g = torch.Generator().manual_seed(B * 10 + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(B, T * P, H, D), r(B, T * P, Hkv, D), r(B, T * P, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    prob = Problem("cpu", torch.float32, B, T * P, H, Hkv, D, text_len=L, T=T, P=P)
    be = fb.FlashInferBackend()
    from lvsa import dispatch
    dispatch.clear_caches()
    plan = dispatch.plan_for(be, mask, prob)
    assert dispatch.plan_for(be, mask, prob) is plan and _FakeBSRWrapper.plans == 1  # once per mask+shape
    out = be.run(plan, q, k, v, tk, tv)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, None), q, k, v, tk, tv)
    assert torch.allclose(out, ref, atol=2e-5)
    be.run(plan, q, k, v, tk, tv, scale=0.1)                            # a new scale replans
    assert _FakeBSRWrapper.plans == 2
    assert plan.wrapper.args[2] == B * T * P                             # batch folded into one call


def test_text_merge_path_follows_the_tensors_device(fake_flashinfer, monkeypatch):
    """CPU tensors never reach the CUDA text-merge kernel (whatever torch.cuda says): the
    merge runs in torch, exactly."""
    from lvsa.backends.reference import ReferenceBackend
    from lvsa_cuda import triton_backend as tb

    def no_kernel(*a, **kw):
        raise AssertionError("the Triton text-merge kernel was called with CPU tensors")

    monkeypatch.setattr(tb, "attend_text_into", no_kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    T, P, D, B, H, L = 5, 6, 16, 1, 2, 3
    mask = plan_schedule(T, 1, 1, 2).mask(0)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, T * P, H, D, generator=g) for _ in range(3))
    tk, tv = (torch.randn(B, L, H, D, generator=g) for _ in range(2))
    prob = Problem("cpu", torch.float32, B, T * P, H, H, D, text_len=L, T=T, P=P)
    be = fb.FlashInferBackend()
    out = be.run(be.plan(mask, prob), q, k, v, tk, tv)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, prob), q, k, v, tk, tv)
    assert torch.allclose(out, ref, atol=2e-5)


def test_strided_k_with_contiguous_v(fake_flashinfer):
    """A K that is a transposed [B, H, S, D] buffer reshapes as a view at batch 1 (found on
    the H200 with CogVideoX): K and V must still reach FlashInfer with one layout."""
    from lvsa.backends.reference import ReferenceBackend
    T, P, D, H = 5, 6, 16, 3
    mask = plan_schedule(T, 1, 1, 2).mask(1)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, H, T * P, D, generator=g).transpose(1, 2)    # [1, S, H, D], strided
    k = torch.randn(1, H, T * P, D, generator=g).transpose(1, 2)
    v = torch.randn(1, T * P, H, D, generator=g)                     # contiguous
    assert not k.is_contiguous() and k.reshape(T * P, H, D).stride() != v.reshape(T * P, H, D).stride()
    prob = Problem("cpu", torch.float32, 1, T * P, H, H, D, T=T, P=P)
    be = fb.FlashInferBackend()
    out = be.run(be.plan(mask, prob), q, k, v)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, prob), q, k, v)
    assert torch.allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("rows,L", ROW_CASES)
def test_query_rows_run_only_their_frames(fake_flashinfer, rows, L):
    """Sequence parallelism: q holds rows [lo, hi) (frames cut anywhere); the plan has
    only the block rows of the frames they touch and the result equals the reference rows."""
    mask, q, k, v, tk, tv, ref = query_rows_case(L)
    (B, S), T, lo, hi = q.shape[:2], mask.num_frames, rows[0], rows[1]
    P = S // T
    be = fb.FlashInferBackend()
    plan = be.plan(mask, Problem.from_tensors(q[:, lo:hi], k, mask, tk, q_rows=rows))
    f0, f1 = lo // P, -(-hi // P)
    assert plan.wrapper.args[2] == B * (f1 - f0) * P and plan.wrapper.args[3] == B * T * P
    out = be.run(plan, q[:, lo:hi], k, v, tk, tv)
    assert out.shape == q[:, lo:hi].shape and torch.allclose(out, ref[:, lo:hi], atol=2e-5)


def test_run_refuses_a_plan_of_another_batch_or_shape(fake_flashinfer):
    """FlashInfer's CSR covers batch x frames: unlike fa4's tables, the batch must match too."""
    mask, q, k, v, _, _, _ = query_rows_case(0)
    be = fb.FlashInferBackend()
    plan = be.plan(mask, Problem.from_tensors(q, k, mask, None))
    with pytest.raises(ValueError, match=r"flashinfer plan was made for batch=2 heads=2/1"):
        be.run(plan, q[:1], k[:1], v[:1])
    with pytest.raises(ValueError, match="flashinfer plan was made for batch=2"):
        be.run(plan, q[..., :8].contiguous(), k[..., :8].contiguous(), v[..., :8].contiguous())
    with pytest.raises(TypeError, match=r"flashinfer.run\(\) takes the FlashInferPlan"):
        be.run(object(), q, k, v)
