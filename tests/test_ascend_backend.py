"""The ``ascend`` backend on CPU: against the reference backend through an emulated
``torch_npu`` whose ``npu_fusion_attention`` is itself checked against dense float64
attention; detection in every torch_npu state; registration and automatic selection.

No Ascend hardware is involved: see tests/ascend_emulation.py.
"""
import importlib
import importlib.metadata as md
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ascend_emulation as emu
from ascend_emulation import emulated_npu, emulated_npu_no_device  # noqa: F401 - fixtures
from lvsa import devices
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.mask import BlockMask
from lvsa.schedule import plan_schedule
from lvsa_ascend.backend import AscendBackend, AscendPlan, head_slices

CANN_ERROR = "libhccl.so: cannot open shared object file: No such file or directory"


# ====================================================== emulation vs float64
def dense64(q, k, v, scale, mask=None):
    """Plain attention in float64 over ``[B, N, S, D]``; ``mask`` True = masked.
    Returns ``(out, rowmax, rowsum)`` with masked logits at -40000."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = torch.where(mask, torch.full_like(s, -40000.0), s)
    m = s.max(-1).values
    e = torch.exp(s - m[..., None])
    return (e / e.sum(-1, keepdim=True)) @ v, m, e.sum(-1)


def _bnsd_to(t, layout):
    B, N, S, D = t.shape
    return {"BNSD": t, "BSND": t.transpose(1, 2),
            "BSH": t.transpose(1, 2).reshape(B, S, N * D),
            "SBH": t.transpose(1, 2).reshape(B, S, N * D).transpose(0, 1)}[layout].contiguous()


def _check_stats(smax, ssum, m, s, shape):
    assert smax.dtype == torch.float32 and ssum.dtype == torch.float32
    assert tuple(smax.shape) == shape + (8,) and tuple(ssum.shape) == shape + (8,)
    assert torch.equal(smax, smax[..., :1].expand_as(smax))  # the value repeated 8 times
    assert torch.equal(ssum, ssum[..., :1].expand_as(ssum))
    torch.testing.assert_close(smax[..., 0].double(), m, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ssum[..., 0].double(), s, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH", "SBH"])
def test_emulation_dense_layouts_match_float64(layout):
    g = torch.Generator().manual_seed(1)
    B, N, Nkv, Sq, Skv, D = 2, 6, 3, 7, 11, 16
    q = torch.randn(B, N, Sq, D, generator=g)
    k = torch.randn(B, Nkv, Skv, D, generator=g)
    v = torch.randn(B, Nkv, Skv, D, generator=g)
    out, smax, ssum, *_ = emu.npu_fusion_attention(
        _bnsd_to(q, layout), _bnsd_to(k, layout), _bnsd_to(v, layout), N, layout, scale=0.37)
    o, m, s = dense64(q, k, v, 0.37)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _bnsd_to(o, layout), atol=1e-5, rtol=1e-5)
    _check_stats(smax, ssum, m, s, (B, N, Sq))


def test_emulation_scale_defaults_to_one():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=g) for _ in range(3))
    out = emu.npu_fusion_attention(q, k, v, 2, "BSND")[0]
    o1 = dense64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0)[0]
    torch.testing.assert_close(out.double(), o1.transpose(1, 2), atol=1e-5, rtol=1e-5)
    o_sqrt = dense64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 8 ** -0.5)[0]
    assert not torch.allclose(out.double(), o_sqrt.transpose(1, 2), atol=1e-3)


@pytest.mark.parametrize("shape", ["SS", "11SS", "B1SS", "BNSS"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_emulation_mask_polarity_true_is_masked(shape, dtype):
    g = torch.Generator().manual_seed(3)
    B, N, Sq, Skv, D = 2, 2, 5, 9, 8
    q = torch.randn(B, N, Sq, D, generator=g)
    k, v = torch.randn(B, N, Skv, D, generator=g), torch.randn(B, N, Skv, D, generator=g)
    full = torch.rand(B, N, Sq, Skv, generator=g) < 0.5
    full[..., 0] = False  # no fully masked row here
    mask = {"SS": full[0, 0], "11SS": full[:1, :1], "B1SS": full[:, :1], "BNSS": full}[shape]
    out, smax, ssum, *_ = emu.npu_fusion_attention(q, k, v, N, "BNSD", atten_mask=mask.to(dtype),
                                                    scale=0.5)
    bmask = mask.expand(B, N, Sq, Skv)
    o, m, s = dense64(q, k, v, 0.5, bmask)
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)
    _check_stats(smax, ssum, m, s, (B, N, Sq))
    # and the masked keys really are the True ones: dropping them gives the same answer
    b0 = ~bmask[0, 0, 1]
    o_sub = dense64(q[:1, :1, 1:2], k[:1, :1, :, :][..., b0, :], v[:1, :1][..., b0, :], 0.5)[0]
    torch.testing.assert_close(out[0, 0, 1].double(), o_sub[0, 0, 0], atol=1e-5, rtol=1e-5)


def test_emulation_fully_masked_row_fills_minus_40000_outside_tnd():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    out, smax, ssum, *_ = emu.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, scale=1.0)
    assert smax[0, 0, 0, 0].item() == -40000.0 and ssum[0, 0, 0, 0].item() == 3.0
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0))  # uniform over filled logits
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 0])


def _tnd_case(seed, qlens, kvlens, N=4, Nkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(qlens), N, D, generator=g)
    k = torch.randn(sum(kvlens), Nkv, D, generator=g)
    v = torch.randn(sum(kvlens), Nkv, D, generator=g)
    cq = [sum(qlens[:i + 1]) for i in range(len(qlens))]
    ck = [sum(kvlens[:i + 1]) for i in range(len(kvlens))]
    return q, k, v, cq, ck


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_emulation_tnd_cumulative_lengths_match_float64(softmax_layout):
    qlens, kvlens = [3, 0, 5, 1], [4, 0, 2, 7]  # the empty sequence repeats the previous value
    q, k, v, cq, ck = _tnd_case(4, qlens, kvlens)
    assert cq == [3, 3, 8, 9] and ck == [4, 4, 6, 13]
    out, smax, ssum, *_ = emu.npu_fusion_attention(
        q, k, v, 4, "TND", scale=0.3, actual_seq_qlen=cq, actual_seq_kvlen=ck,
        softmax_layout=softmax_layout)
    T = q.shape[0]
    want = (4, T, 8) if softmax_layout == "" else (T, 4, 8)
    assert tuple(smax.shape) == want and tuple(ssum.shape) == want
    if softmax_layout == "TND":
        smax, ssum = smax.transpose(0, 1), ssum.transpose(0, 1)
    q0 = k0 = 0
    for ql, kl in zip(qlens, kvlens):
        if ql:
            o, m, s = dense64(q[q0:q0 + ql].transpose(0, 1)[None], k[k0:k0 + kl].transpose(0, 1)[None],
                              v[k0:k0 + kl].transpose(0, 1)[None], 0.3)
            torch.testing.assert_close(out[q0:q0 + ql].double(), o[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
            _check_stats(smax[:, q0:q0 + ql], ssum[:, q0:q0 + ql], m[0], s[0], (4, ql))
        q0, k0 = q0 + ql, k0 + kl


def test_emulation_tnd_shared_ss_mask():
    qlens, kvlens = [2, 3], [3, 4]
    q, k, v, cq, ck = _tnd_case(5, qlens, kvlens, N=2, Nkv=2)
    mask = torch.tensor([[False, True, False, True], [True, False, False, True],
                         [False, False, True, False]])
    out = emu.npu_fusion_attention(q, k, v, 2, "TND", atten_mask=mask, scale=1.0,
                                   actual_seq_qlen=cq, actual_seq_kvlen=ck)[0]
    for (q0, ql, k0, kl) in [(0, 2, 0, 3), (2, 3, 3, 4)]:
        mm = mask[:ql, :kl]
        o = dense64(q[q0:q0 + ql].transpose(0, 1)[None], k[k0:k0 + kl].transpose(0, 1)[None],
                    v[k0:k0 + kl].transpose(0, 1)[None], 1.0, mm)[0]
        torch.testing.assert_close(out[q0:q0 + ql].double(), o[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def _raises(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        emu.npu_fusion_attention(*args, **kw)


def test_emulation_raises_on_documented_violations():
    q, k, v, cq, ck = _tnd_case(6, [2, 2], [2, 2], N=2, Nkv=1)
    tnd = dict(actual_seq_qlen=cq, actual_seq_kvlen=ck)
    _raises(ValueError, "cumulative", q, k, v, 2, "TND", actual_seq_qlen=[2, 1, 4], actual_seq_kvlen=[2, 3, 4])
    _raises(ValueError, "ends at", q, k, v, 2, "TND", actual_seq_qlen=[2, 3], actual_seq_kvlen=ck)
    _raises(TypeError, "list", q, k, v, 2, "TND", actual_seq_qlen=torch.tensor(cq), actual_seq_kvlen=ck)
    _raises(ValueError, "needs both", q, k, v, 2, "TND", actual_seq_qlen=cq)
    _raises(ValueError, "no keys", q, k, v, 2, "TND", actual_seq_qlen=[2, 4], actual_seq_kvlen=[4, 4])
    row = torch.tensor([[True, True], [False, True]])
    _raises(ValueError, "fully masked", q, k, v, 2, "TND", atten_mask=row, **tnd)
    _raises(ValueError, "SS", q, k, v, 2, "TND", atten_mask=row[None, None], **tnd)
    n = emu.MAX_VARLEN_SEQS + 1
    qq, kk = torch.randn(n, 1, 4), torch.randn(n, 1, 4)
    _raises(ValueError, "at most 2048", qq, kk, kk, 1, "TND", actual_seq_qlen=list(range(1, n + 1)),
            actual_seq_kvlen=list(range(1, n + 1)))
    b = torch.randn(1, 3, 2, 4)
    _raises(ValueError, "head dim", torch.randn(1, 1, 1, 769), torch.randn(1, 1, 1, 769),
            torch.randn(1, 1, 1, 769), 1, "BSND")
    big = torch.randn(1, 1, 257, 2)
    _raises(ValueError, "query heads", big, big, big, 257, "BSND")
    _raises(ValueError, "GQA", torch.randn(1, 3, 3, 4), b, b, 3, "BSND")
    _raises(ValueError, "head_num", b, b, b, 1, "BSND")
    _raises(TypeError, "one dtype", b, b.half(), b.half(), 2, "BSND")
    _raises(TypeError, "fp16/bf16/fp32", b.double(), b.double(), b.double(), 2, "BSND")
    _raises(ValueError, "not BNSS", b, b, b, 2, "BSND", atten_mask=torch.zeros(2, 2, dtype=torch.bool))
    _raises(TypeError, "bool or uint8", b, b, b, 2, "BSND", atten_mask=torch.zeros(3, 3))
    _raises(ValueError, "input_layout", b, b, b, 2, "BSDN")
    _raises(NotImplementedError, "dropout", b, b, b, 2, "BSND", keep_prob=0.9)
    _raises(NotImplementedError, "sparse_mode", b, b, b, 2, "BSND",
            atten_mask=torch.zeros(3, 3, dtype=torch.bool), sparse_mode=2)
    _raises(NotImplementedError, "pse", b, b, b, 2, "BSND", pse=torch.zeros(1))
    # with atten_mask=None, sparse_mode and pre/next are ignored (documented)
    a = emu.npu_fusion_attention(b, b, b, 2, "BSND", sparse_mode=3, pre_tockens=1, next_tockens=0)[0]
    torch.testing.assert_close(a, emu.npu_fusion_attention(b, b, b, 2, "BSND")[0])


# ====================================================== backend vs reference
def _inputs(seed, B, T, P, H, Hkv, D, L, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S = T * P

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = r(B, S, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    return q, k, v, tk, tv


def _compare(mask, B, P, H, Hkv, D, L, seed, scale=None, dtype=torch.float32, backend=None,
             atol=2e-5):
    ab = backend or AscendBackend()
    rb = ReferenceBackend()
    q, k, v, tk, tv = _inputs(seed, B, mask.num_frames, P, H, Hkv, D, L, dtype)
    out = ab.run(ab.plan(mask, None), q, k, v, tk, tv, scale)
    assert out.dtype == dtype and out.shape == q.shape
    up = [None if t is None else t.float() for t in (q, k, v, tk, tv)]
    ref = rb.run(rb.plan(mask, None), *up, scale)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)
    for c in emu.CALLS:  # never a mask tensor: no S×S mask, no token band
        assert c["atten_mask"] is None
        assert c["scale"] == pytest.approx(scale if scale is not None else 1 / math.sqrt(D))
        assert c["num_seqs"] <= 2048
    return out


CASES = {
    # name: (T, W, n, ref, offset, B, P, H, Hkv, D, L)
    "ragged_P_text_gqa_batch": (17, 2, 1, 6, 1, 2, 7, 4, 2, 16, 5),
    "wan_like_rotation": (33, 3, 1, 21, 1, 1, 5, 2, 1, 8, 0),
    "T1": (1, 3, 1, 21, 0, 2, 9, 2, 2, 8, 3),
    "globals_only_W0": (14, 0, 1, 4, 2, 1, 6, 3, 3, 8, 2),
    "dense_T_le_ref": (7, 3, 1, 21, 0, 2, 5, 4, 1, 8, 4),
    "dense_no_text_P13": (5, 1, 1, 9, 0, 1, 13, 2, 2, 32, 0),
    "n3_no_rotation": (25, 2, 3, 8, 0, 1, 3, 6, 2, 8, 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_matches_reference_fp32(emulated_npu, name):
    T, W, n, ref, off, B, P, H, Hkv, D, L = CASES[name]
    mask = plan_schedule(T, W, n, ref).mask(off)
    _compare(mask, B, P, H, Hkv, D, L, seed=hash(name) % 1000, scale=0.21)
    layouts = {c["layout"] for c in emu.CALLS}
    assert "BSND" in layouts
    if any(set(range(lo, hi + 1)) - set(mask.globals) for lo, hi in (mask.windows or ())):
        assert "TND" in layouts
    else:
        assert "TND" not in layouts  # dense / globals-only: no window part at all


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_matches_reference_half(emulated_npu, dtype):
    mask = plan_schedule(20, 2, 1, 8).mask(2)
    _compare(mask, 2, 6, 4, 2, 16, 3, seed=7, dtype=dtype, atol=3e-2)


def test_default_scale_is_passed_explicitly(emulated_npu):
    mask = plan_schedule(12, 1, 1, 5).mask(0)
    _compare(mask, 1, 4, 2, 2, 24, 2, seed=8, scale=None)  # asserts each call got 1/sqrt(24)


def test_frames_whose_window_is_all_global_skip_the_window_part(emulated_npu):
    # frames 0-2 see only globals inside their windows: packing them would put a
    # fully masked (empty-key) sequence into TND, which the op forbids
    mask = BlockMask(8, (0, 1, 2, 6), ((0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 7)))
    _compare(mask, 2, 3, 2, 1, 8, 0, seed=9, scale=0.5)
    (tnd,) = [c for c in emu.CALLS if c["layout"] == "TND"]
    plan = AscendPlan.build(mask, 1 << 18)
    assert [f for f, _ in plan.window_seqs] == [2, 3, 4, 5, 6, 7]
    assert tnd["num_seqs"] == 2 * 6
    P = 3
    assert tnd["actual_seq_qlen"] == [P * (i + 1) for i in range(12)]
    per = [len(r) for _, r in plan.window_seqs] * 2  # kv frames: 3,(3,4),(4,5),5,7,7 ...
    assert tnd["actual_seq_kvlen"] == [P * sum(per[:i + 1]) for i in range(12)]


def test_window_only_mask_without_globals(emulated_npu):
    mask = BlockMask(6, (), tuple((max(0, f - 1), min(5, f + 1)) for f in range(6)))
    _compare(mask, 1, 4, 2, 2, 8, 0, seed=10, scale=0.4)
    _compare(mask, 1, 4, 2, 2, 8, 3, seed=11, scale=0.4)


def test_contiguous_globals_are_sliced_not_gathered(emulated_npu):
    mask = BlockMask(7, (0, 1), tuple((max(0, f - 1), min(6, f + 1)) for f in range(7)))
    _compare(mask, 2, 5, 2, 2, 8, 2, seed=15, scale=0.6)
    g = [c for c in emu.CALLS if c["layout"] == "BSND" and c["k_shape"][1] == 2 * 5]
    assert len(g) == 1  # the globals call saw exactly frames 0-1


def test_sequences_longer_than_the_op_limit_are_split(emulated_npu, monkeypatch):
    import lvsa_ascend.backend as mod

    monkeypatch.setattr(mod, "MAX_SEQ", 10)  # stands in for the documented 1M tokens
    mask = plan_schedule(16, 2, 1, 6).mask(3)
    _compare(mask, 2, 3, 2, 1, 8, 12, seed=16, scale=0.3)
    bsnd = [c for c in emu.CALLS if c["layout"] == "BSND"]
    assert all(c["q_shape"][1] <= 10 and c["k_shape"][1] <= 10 for c in bsnd)
    assert len(bsnd) > 10
    assert all(c["q_shape"][0] <= 10 for c in emu.CALLS if c["layout"] == "TND")


def test_varlen_calls_are_split_by_sequence_and_kv_budget(emulated_npu):
    mask = plan_schedule(30, 3, 1, 8).mask(1)
    ab = AscendBackend()
    ab.max_varlen_seqs, ab.window_kv_tokens = 3, 40
    _compare(mask, 2, 4, 2, 1, 8, 2, seed=12, scale=0.3, backend=ab)
    tnd = [c for c in emu.CALLS if c["layout"] == "TND"]
    assert len(tnd) > 4
    assert all(c["num_seqs"] <= 3 for c in tnd)
    assert all(c["k_shape"][0] <= 40 or c["num_seqs"] == 1 for c in tnd)
    assert sum(c["num_seqs"] for c in tnd) == 2 * len(ab.plan(mask).window_seqs)


def test_more_than_2048_sequences_split_at_the_op_limit(emulated_npu):
    mask = plan_schedule(1100, 1, 1, 4).mask(0)
    _compare(mask, 2, 1, 1, 1, 4, 0, seed=13, scale=1.0)
    tnd = [c["num_seqs"] for c in emu.CALLS if c["layout"] == "TND"]
    assert max(tnd) == 2048 and sum(tnd) > 2048


@pytest.mark.parametrize("H,Hkv", [(512, 2), (520, 1), (300, 300)])
def test_more_than_256_heads_split_in_whole_gqa_groups(emulated_npu, H, Hkv):
    mask = plan_schedule(6, 1, 1, 2).mask(1)
    _compare(mask, 1, 2, H, Hkv, 4, 1, seed=14, scale=0.5)
    assert all(c["head_num"] <= 256 for c in emu.CALLS)


@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (256, 1), (512, 2), (520, 1), (300, 300), (40, 40)])
def test_head_slices_cover_each_head_once(H, Hkv):
    rep = H // Hkv
    seen = []
    for qa, qb, ka, kb in head_slices(H, Hkv):
        assert 1 <= qb - qa <= 256 and (qb - qa) % (kb - ka) == 0
        assert (qb - qa) // (kb - ka) in (rep, qb - qa)
        for h in range(qa, qb):  # the op maps local head h to local kv head h // ratio
            ratio = (qb - qa) // (kb - ka)
            assert ka + (h - qa) // ratio == h // rep
        seen.extend(range(qa, qb))
    assert seen == list(range(H))


def test_plan_is_built_once_per_mask():
    from lvsa import dispatch
    mask = plan_schedule(20, 2, 1, 8).mask(0)
    ab = AscendBackend()
    prob = _problem()
    assert dispatch.plan_for(ab, mask, prob) is dispatch.plan_for(ab, mask, prob)  # one cache
    with pytest.raises(ValueError, match="attend to no frame"):
        BlockMask(3, (), None)  # refused before any backend sees it


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 12), W=st.integers(0, 3), n=st.integers(0, 2), ref=st.integers(1, 8),
       off=st.integers(0, 20), B=st.integers(1, 2), P=st.integers(1, 9), Hkv=st.integers(1, 2),
       rep=st.integers(1, 3), D=st.sampled_from([4, 8, 16]), L=st.integers(0, 4),
       expand=st.booleans(), seed=st.integers(0, 2**16))
def test_backend_matches_reference_random(emulated_npu, T, W, n, ref, off, B, P, Hkv, rep, D, L,
                                          expand, seed):
    mask = plan_schedule(T, W, n, ref, expand=expand).mask(off)
    emu.CALLS.clear()
    _compare(mask, B, P, Hkv * rep, Hkv, D, L, seed=seed, scale=0.3)


# ====================================================== detection
def _problem(**kw):
    base = dict(device_kind="npu", dtype=torch.bfloat16, batch=1, seq_len=21 * 1560, num_heads=40,
                num_kv_heads=40, head_dim=128, text_len=0, T=21, P=1560)
    base.update(kw)
    return Problem(**base)


@pytest.fixture
def no_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert importlib.util.find_spec("torch_npu") is None
    devices.npu_status(refresh=True)
    yield
    monkeypatch.undo()
    devices.npu_status(refresh=True)


@pytest.fixture
def broken_torch_npu(monkeypatch, tmp_path):
    """A torch_npu that is installed but whose import fails as without CANN."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"raise ImportError({CANN_ERROR!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    importlib.invalidate_caches()
    devices.npu_status(refresh=True)
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop("torch_npu", None)
    importlib.invalidate_caches()
    devices.npu_status(refresh=True)


def test_detect_torch_npu_absent(no_torch_npu):
    ab = AscendBackend()
    assert ab.availability_reasons() == ["package 'torch_npu' is not installed (pip install torch-npu)"]
    assert "not installed" in " ".join(ab.not_supported_reasons(_problem()))
    assert not devices.npu_status().installed


def test_detect_cann_missing(broken_torch_npu):
    st_ = devices.npu_status()
    assert st_.installed and not st_.importable and not st_.available
    (reason,) = AscendBackend().availability_reasons()
    assert "fails to import" in reason and "libhccl.so" in reason and "set_env.sh" in reason
    assert "torch_npu" not in sys.modules
    assert devices.default_device_kind() == "cpu"  # the CPU path is unaffected


def test_detect_no_device(emulated_npu_no_device):
    (reason,) = AscendBackend().availability_reasons()
    assert "no NPU is visible" in reason
    assert devices.npu_status().importable and not devices.npu_status().available


def test_detect_working(emulated_npu):
    ab = AscendBackend()
    assert ab.availability_reasons() == []
    assert ab.not_supported_reasons(_problem()) == []
    assert ab.not_supported_reasons(_problem(num_heads=64, num_kv_heads=8, text_len=256)) == []
    assert devices.npu_status().available and devices.npu_status().device_count == 1
    assert any("device is cuda" in r for r in ab.not_supported_reasons(_problem(device_kind="cuda")))
    assert any("head_dim is 1024" in r for r in ab.not_supported_reasons(_problem(head_dim=1024)))
    assert any("float64" in r for r in ab.not_supported_reasons(_problem(dtype=torch.float64)))
    assert any("not a whole GQA" in r for r in ab.not_supported_reasons(_problem(num_heads=40, num_kv_heads=6)))
    assert any("not T*P" in r for r in ab.not_supported_reasons(_problem(seq_len=100)))
    assert devices.collective_backend("npu") == "hccl"


def test_detect_torch_npu_without_the_op(emulated_npu, monkeypatch):
    monkeypatch.delattr(emulated_npu, "npu_fusion_attention")
    (reason,) = AscendBackend().availability_reasons()
    assert "has no npu_fusion_attention" in reason


_PROBE = textwrap.dedent("""
    import lvsa, lvsa.devices
    from lvsa_ascend.backend import AscendBackend
    print("REASONS", AscendBackend().availability_reasons())
    print("KIND", lvsa.devices.default_device_kind())
""")


def test_torch_autoload_failure_and_the_documented_way_out(tmp_path):
    """torch_npu registered for torch's device auto-load but CANN missing: ``import torch``
    itself fails with the message lvsa's reason points to; with
    ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` lvsa imports and the backend explains itself."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(f"raise ImportError({CANN_ERROR!r})\n")
    dist = tmp_path / "torch_npu-2.5.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.5.1\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TORCH_DEVICE_BACKEND_AUTOLOAD="1")
    p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "Failed to load the backend extension: torch_npu" in p.stderr
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in p.stderr
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    p = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "libhccl.so" in p.stdout and "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in p.stdout
    assert "KIND cpu" in p.stdout


# ====================================================== registration and selection
def test_registered_through_the_lvsa_entry_point():
    from lvsa import plugins

    eps = {ep.name: ep.value for ep in md.entry_points(group="lvsa")}
    assert eps.get("ascend") == "lvsa_ascend.backend"
    plugins.reset()
    try:
        bk = plugins.backends()["ascend"]
        assert isinstance(bk, AscendBackend) and bk.distribution == "lvsa-ascend"
    finally:
        plugins.reset()


@pytest.fixture
def clean_selection(monkeypatch):
    from lvsa import dispatch, plugins

    for var in ("LVSA_BACKEND", "LVSA_CONFIG", "LVSA_LOAD_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    plugins.reset()
    dispatch.clear_caches()
    yield dispatch
    dispatch.clear_caches()
    plugins.reset()


def test_selected_automatically_when_an_npu_is_present(emulated_npu, clean_selection):
    sel = clean_selection.select_backend(_problem())
    assert sel.backend.name == "ascend" and sel.auto and sel.refused == {}
    # a problem it cannot run falls to the reference, with the reason recorded
    sel = clean_selection.select_backend(_problem(head_dim=1024))
    assert sel.backend.name == "reference"
    assert any("head_dim is 1024" in r for r in sel.refused["ascend"])


def test_not_selected_without_an_npu(no_torch_npu, clean_selection):
    sel = clean_selection.select_backend(_problem())
    assert sel.backend.name == "reference"
    assert sel.refused["ascend"] == ["package 'torch_npu' is not installed (pip install torch-npu)"]
    with pytest.raises(clean_selection.BackendUnavailable, match="torch_npu"):
        clean_selection.select_backend(_problem(), requested="ascend")
