"""The reference backend against dense masked attention in float64, and its input checks."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import lvsa
from lvsa.ops import LVSAInputError, append_text, attention_lse, dense_attention, merge_lse, sdpa
from lvsa.schedule import plan_schedule


def dense_masked(q, k, v, mask, text_k=None, text_v=None, scale=None):
    """Oracle: full softmax with the token-level mask (float64 when inputs are)."""
    S = q.shape[1]
    tm = mask.to_dense("token", tokens_per_frame=S // mask.num_frames)
    if text_k is not None:
        tm = torch.cat([tm, torch.ones(S, text_k.shape[1], dtype=torch.bool)], 1)
        k, v = torch.cat([k, text_k], 1), torch.cat([v, text_v], 1)
    return sdpa(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5, attn_mask=tm)


def make(B, T, P, H, Hkv, D, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = r(B, T * P, H, D), r(B, T * P, Hkv, D), r(B, T * P, Hkv, D)
    tk = r(B, L, Hkv, D) if L else None
    tv = r(B, L, Hkv, D) if L else None
    return q, k, v, tk, tv


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 12), P=st.integers(1, 13), W=st.integers(0, 3), n=st.integers(0, 2),
       ref=st.integers(1, 8), kfi=st.one_of(st.none(), st.integers(1, 6)), offset=st.integers(0, 7),
       heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (6, 3), (4, 1)]), L=st.integers(0, 5),
       B=st.integers(1, 2), D=st.sampled_from([8, 16]), seed=st.integers(0, 2**31 - 1),
       scale=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_reference_matches_dense_masked_float64(T, P, W, n, ref, kfi, offset, heads, L, B, D, seed, scale):
    H, Hkv = heads
    mask = plan_schedule(T, W, n, ref, kfi=kfi).mask(offset)
    q, k, v, tk, tv = make(B, T, P, H, Hkv, D, L, seed=seed)
    out = lvsa.attention(q, k, v, mask, tk, tv, scale=scale, backend="reference")
    ref_out = dense_masked(q, k, v, mask, tk, tv, scale)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert torch.allclose(out, ref_out, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", [
    dict(T=1, P=7, W=3, ref=4),            # a single frame
    dict(T=5, P=9, W=3, ref=2),            # T <= window
    dict(T=16, P=10, W=0, ref=4),          # globals only
    dict(T=21, P=3, W=3, ref=21),          # dense by design
    dict(T=30, P=5, W=2, ref=8),           # P not a multiple of 8
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_reference_low_precision_close_to_float64(case, dtype, tol):
    mask = plan_schedule(case["T"], case["W"], 1, case["ref"]).mask(1)
    q, k, v, tk, tv = make(2, case["T"], case["P"], 4, 2, 16, 3, seed=case["T"])
    want = dense_masked(q, k, v, mask, tk, tv)
    got = lvsa.attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, tk.to(dtype), tv.to(dtype),
                         backend="reference")
    assert got.dtype == dtype
    err = (got.double() - want).norm() / want.norm()
    assert err < tol


def test_reference_never_builds_a_full_mask(monkeypatch):
    """Each SDPA call sees at most one frame group's context, never an attn_mask."""
    T, P = 24, 6
    mask = plan_schedule(T, 2, 1, 6).mask(0)
    q, k, v, tk, tv = make(1, T, P, 2, 2, 8, 4)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(qq, kk, vv, attn_mask=None, **kw):
        assert attn_mask is None
        seen.append((qq.shape[-2], kk.shape[-2]))
        return real(qq, kk, vv, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lvsa.attention(q, k, v, mask, tk, tv, backend="reference")
    max_ctx = max(len(r) for r in mask.attended_lists) * P + 4
    assert seen and all(kv <= max_ctx for _, kv in seen)
    assert all(qlen < T * P for qlen, _ in seen)


def test_merge_lse_is_exact():
    q, k, v, _, _ = make(1, 2, 5, 2, 2, 8, 0)
    o_all, l_all = attention_lse(q, k, v, 0.3)
    o_a, l_a = attention_lse(q, k[:, :4], v[:, :4], 0.3)
    o_b, l_b = attention_lse(q, k[:, 4:], v[:, 4:], 0.3)
    o, lse = merge_lse(o_a, l_a, o_b, l_b)
    assert torch.allclose(o.double(), o_all.double(), atol=1e-5)
    assert torch.allclose(lse, l_all, atol=1e-5)
    # an empty side (lse = -inf) leaves the other untouched
    o2, l2 = merge_lse(o_a, l_a, torch.zeros_like(o_a), torch.full_like(l_a, float("-inf")))
    assert torch.allclose(o2, o_a.float()) and torch.allclose(l2, l_a)


def test_text_keys_go_after_the_video_keys_and_no_text_is_no_copy():
    """The one joint key sequence (video keys, then text keys) of lvsa.ops.append_text, which
    the dense path, the reference and the bench's dense kernels attend; no text (None or zero
    tokens) leaves K/V as they are, and attends exactly as no text does."""
    mask, q, k, v, tk, tv = _ok()
    jk, jv = append_text(k, v, tk, tv)
    assert jk.shape[1] == k.shape[1] + tk.shape[1]
    assert torch.equal(jk[:, :k.shape[1]], k) and torch.equal(jk[:, k.shape[1]:], tk)
    assert torch.equal(jv[:, :v.shape[1]], v) and torch.equal(jv[:, v.shape[1]:], tv)
    none = tk[:, :0], tv[:, :0]
    for text in ((None, None), none):
        got = append_text(k, v, *text)
        assert got[0] is k and got[1] is v
    assert torch.equal(dense_attention(q, k, v, *none), dense_attention(q, k, v))
    assert torch.equal(lvsa.attention(q, k, v, mask, *none, backend="reference"),
                       lvsa.attention(q, k, v, mask, backend="reference"))
    torch.testing.assert_close(dense_attention(q, k, v, tk, tv), sdpa(q, jk, jv, q.shape[-1] ** -0.5))


# ------------------------------------------------------------------------ bad input
def _ok():
    mask = plan_schedule(4, 1, 1, 2, tokens_per_frame=3).mask(0)
    q, k, v, tk, tv = make(1, 4, 3, 2, 2, 8, 2, dtype=torch.float32)
    return mask, q, k, v, tk, tv


@pytest.mark.parametrize("mutate,match", [
    (lambda m, q, k, v, tk, tv: (m, q[0], k, v, tk, tv), r"q has shape .*\[B, S, H, D\]"),
    (lambda m, q, k, v, tk, tv: (m, q, k, v[:, :-1], tk, tv), "same shape"),
    (lambda m, q, k, v, tk, tv: (m, q, k.double(), v.double(), tk, tv), "cast all three"),
    (lambda m, q, k, v, tk, tv: (m, q[:, :-1], k[:, :-1], v[:, :-1], tk, tv), "not T\\*P"),
    (lambda m, q, k, v, tk, tv: (m, q, k[:, :, :1].expand(-1, -1, 3, -1).contiguous()[:, :, :3],
                                 v[:, :, :1].expand(-1, -1, 3, -1).contiguous(), tk, tv), "whole"),
    (lambda m, q, k, v, tk, tv: (m, q, k, v, tk, None), "together"),
    (lambda m, q, k, v, tk, tv: (m, q, k, v, tk[..., :4], tv[..., :4]), "text_k has shape"),
    (lambda m, q, k, v, tk, tv: (m, q, k, v.to("meta"), tk, tv), "one device"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = mutate(*_ok())
    with pytest.raises(LVSAInputError, match=match):
        lvsa.attention(args[1], args[2], args[3], args[0], args[4], args[5], backend="reference")


def test_bad_scale():
    mask, q, k, v, tk, tv = _ok()
    with pytest.raises(LVSAInputError, match="scale"):
        lvsa.attention(q, k, v, mask, scale=-1.0)


@pytest.mark.parametrize("name", ["q", "k", "v", "text_k", "text_v"])
def test_checked_mode_rejects_non_finite(monkeypatch, name):
    monkeypatch.setenv("LVSA_CHECK", "1")
    mask, q, k, v, tk, tv = _ok()
    t = dict(q=q, k=k, v=v, text_k=tk, text_v=tv)
    t[name][0, 0, 0, 0] = float("nan")
    with pytest.raises(LVSAInputError, match=f"^{name} holds 1 non-finite"):
        lvsa.attention(t["q"], t["k"], t["v"], mask, t["text_k"], t["text_v"])


def test_unchecked_mode_lets_nan_through(monkeypatch):
    # (a NaN in q can come out as zeros from torch's CPU SDPA: a reason for LVSA_CHECK=1)
    monkeypatch.setenv("LVSA_CHECK", "0")
    mask, q, k, v, tk, tv = _ok()
    v[0, 0, 0, 0] = float("nan")
    out = lvsa.attention(q, k, v, mask, tk, tv)
    assert torch.isnan(out).any()


@pytest.mark.parametrize("rows", [(0, 40), (13, 61), (60, 120), (7, 8)])
@pytest.mark.parametrize("L", [0, 5])
def test_query_rows_equal_the_rows_of_the_full_call(rows, L):
    """Sequence parallelism: rows [lo, hi) (frames cut anywhere) are bit-identical to the
    same rows of the full call, with and without text."""
    q, k, v, tk, tv = make(2, 10, 12, 4, 2, 16, L, dtype=torch.float32, seed=3)
    mask = plan_schedule(10, 1, 1, 4, kfi=3).mask_for_step(1)
    full = lvsa.attention(q, k, v, mask, tk, tv, backend="reference")
    lo, hi = rows
    part = lvsa.attention(q[:, lo:hi], k, v, mask, tk, tv, backend="reference", q_rows=rows)
    assert torch.equal(part, full[:, lo:hi])


def test_query_rows_are_checked_and_refused_by_backends_without_them():
    from lvsa.backend import Backend, Problem

    q, k, v, _, _ = make(1, 4, 6, 2, 2, 8, 0, dtype=torch.float32)
    mask = plan_schedule(4, 1, 1, 2, kfi=2).mask_for_step(0)
    with pytest.raises(LVSAInputError, match="q_rows"):
        lvsa.attention(q[:, :5], k, v, mask, q_rows=(0, 6))
    problem = Problem.from_tensors(q[:, :6], k, mask, q_rows=(0, 6))
    assert problem.seq_len == 24 and any("query rows" in r for r in Backend().not_supported_reasons(problem))
