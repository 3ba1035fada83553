"""The Triton block-sparse kernel against the reference, on the CPU (TRITON_INTERPRET=1).

Small ragged shapes: P not a multiple of the tiles (12, 20, 33), T up to 9, text
tokens, GQA, batch 2, both dtypes and head dims, every kernel mode. The interpreter is
slow, so each case is small and blocks are 16/32 wide (every tail path still runs).
"""
import os

import pytest
import torch

import triton  # noqa: E402,F401  (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)

from lvsa.backend import Problem  # noqa: E402
from lvsa.backends.reference import ReferenceBackend  # noqa: E402
from lvsa.mask import BlockMask  # noqa: E402
from lvsa.schedule import plan_schedule  # noqa: E402
from lvsa_cuda import triton_backend as tb  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
REF = ReferenceBackend()


def _inputs(B, T, P, H, Hkv, D, L, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype).to(DEV)

    S = T * P
    q, k, v = r(B, S, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    return q, k, v, tk, tv


def _expect(mask, q, k, v, tk, tv, scale=None):
    up = [None if t is None else t.double().cpu() for t in (q, k, v, tk, tv)]
    return REF.run(REF.plan(mask, None), *up, scale)


def _err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

CASES = [
    # T, P, H, Hkv, D, B, L, dtype, W, ref, offset, config
    (9, 12, 2, 1, 64, 1, 0, torch.float16, 1, 4, 1, (16, 16, 4, 1, "span")),
    (9, 33, 2, 2, 64, 2, 20, torch.bfloat16, 1, 4, 0, (32, 32, 4, 1, "span")),
    (7, 20, 4, 2, 128, 1, 7, torch.float16, 1, 3, 2, (16, 16, 4, 1, "tiles")),
    (6, 33, 2, 1, 64, 2, 0, torch.bfloat16, 1, 3, 1, (32, 64, 4, 1, "tiles")),
    (5, 20, 2, 2, 64, 1, 5, torch.float16, 0, 2, 0, (16, 32, 4, 1, "gather")),
    (8, 12, 2, 2, 64, 1, 0, torch.float16, 1, 3, 0, (16, 16, 4, 1, "tma")),
]


@pytest.mark.parametrize("T,P,H,Hkv,D,B,L,dtype,W,ref,offset,config", CASES)
def test_matches_reference(T, P, H, Hkv, D, B, L, dtype, W, ref, offset, config):
    mask = plan_schedule(T, W=W, n=1, reference=ref).mask(offset)
    assert not mask.is_dense
    q, k, v, tk, tv = _inputs(B, T, P, H, Hkv, D, L, dtype, seed=T * P + H)
    plan = tb.plan_for(mask, q.device)
    out = torch.full_like(q, float("nan"))
    tb.block_sparse_attention(plan, q, k, v, tk, tv, None, config=config, out=out)
    assert torch.isfinite(out).all(), "some output element was not written"
    assert out.dtype == q.dtype and out.shape == q.shape
    assert _err(out, _expect(mask, q, k, v, tk, tv)) < TOL[dtype]


def test_backend_run_default_config_scale_and_strides():
    """Through the backend API with the default config, a custom scale and
    non-contiguous (transposed-from-BHSD) inputs."""
    mask = plan_schedule(6, W=1, n=1, reference=3).mask(1)
    B, T, P, H, D = 1, 6, 20, 2, 64
    g = torch.Generator().manual_seed(3)
    bhsd = [torch.randn(B, H, T * P, D, generator=g).half().to(DEV) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in bhsd)  # [B, S, H, D] views, not contiguous
    be = tb.TritonBackend()
    out = be.run(be.plan(mask, Problem.from_tensors(q, k, mask)), q, k, v, None, None, 0.2)
    assert _err(out, _expect(mask, q, k, v, None, None, 0.2)) < TOL[torch.float16]


def test_dense_and_globals_only_masks():
    dense = plan_schedule(4, W=1, n=1, reference=21).mask(0)
    assert dense.is_dense
    glob = BlockMask(5, (0, 3), None)
    for mask in (dense, glob):
        q, k, v, tk, tv = _inputs(1, mask.num_frames, 12, 2, 2, 64, 3, torch.float16, 7)
        be = tb.TritonBackend()
        out = be.run(be.plan(mask, Problem.from_tensors(q, k, mask, tk)), q, k, v, tk, tv)
        assert _err(out, _expect(mask, q, k, v, tk, tv)) < TOL[torch.float16]


def test_text_continuation_merges_exactly():
    """attend_text_into (used by the flashinfer backend): a finished softmax given as
    (normalised output, base-2 LSE) continued with the text keys equals the softmax
    over video + text keys."""
    from lvsa.ops import attention_lse
    from lvsa_cuda.flashinfer_backend import natural_to_lse2

    B, S, H, Hkv, D, L = 2, 24, 4, 2, 64, 9
    q, k, v, tk, tv = _inputs(B, 1, S, H, Hkv, D, L, torch.float16, 11)
    scale = D ** -0.5
    o, lse = attention_lse(q.cpu(), k.cpu(), v.cpu(), scale)
    full, _ = attention_lse(q.cpu(), torch.cat([k, tk], 1).cpu(), torch.cat([v, tv], 1).cpu(), scale)
    out = o.half().to(DEV).contiguous()
    tb.attend_text_into(out, natural_to_lse2(lse).contiguous().to(DEV), q, tk, tv, scale)
    assert _err(out, full.double()) < TOL[torch.float16]


def test_tile_table_covers_exactly_the_attended_tokens():
    mask = plan_schedule(9, W=1, n=1, reference=4).mask(1)
    P = 33
    ptr, nfull, tok, length = tb.tile_table(mask, P, 64, 16)
    for f in range(mask.num_frames):
        toks = []
        for i in range(ptr[f], ptr[f + 1]):
            if i < ptr[f] + nfull[f]:
                assert length[i] == 64
            else:
                assert 1 <= length[i] <= 16
            toks.extend(range(tok[i], tok[i] + length[i]))
        want = [c * P + p for c in mask.attended(f) for p in range(P)]
        assert sorted(toks) == want


def test_config_parsing_and_env(monkeypatch):
    assert tb.parse_config("128,64,8,3") == (128, 64, 8, 3, "span")
    assert tb.parse_config("128,128,8,3,tma")[-1] == "tma"
    for bad in ("128,64", "100,64,8,3", "128,64,8,3,warp"):
        with pytest.raises(ValueError, match="LVSA_TRITON_CONFIG"):
            tb.parse_config(bad)
    monkeypatch.setenv("LVSA_TRITON_CONFIG", "64,32,4,2,tiles")
    assert tb.choose_config(128) == (64, 32, 4, 2, "tiles")


def test_supports_reasons():
    be = tb.TritonBackend()
    mask = plan_schedule(9, W=1, n=1, reference=4).mask(0)
    q = torch.zeros(1, 9 * 12, 4, 96, dtype=torch.float32)
    reasons = be.not_supported_reasons(Problem.from_tensors(q, q[:, :, :3], mask))
    text = " | ".join(reasons)
    assert "device is cpu" in text
    assert "dtype is float32" in text
    assert "head_dim is 96" in text
    p = Problem("cuda", torch.bfloat16, 1, 108, 4, 4, 128, T=9, P=12, compute_capability=(7, 5))
    assert any("compute capability is 7.5, needs >= 8.0" in r for r in be.not_supported_reasons(p))
    ok = Problem("cuda", torch.bfloat16, 2, 108, 4, 2, 128, text_len=7, T=9, P=12,
                 compute_capability=(9, 0))
    assert be.not_supported_reasons(ok) == []


def test_registered_through_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="lvsa")}
    assert eps.get("triton") == "lvsa_cuda.triton_backend"
    assert eps.get("flashinfer") == "lvsa_cuda.flashinfer_backend"


def test_config_follows_compute_capability(monkeypatch):
    from lvsa_cuda import triton_backend as tb
    monkeypatch.delenv("LVSA_TRITON_CONFIG", raising=False)
    monkeypatch.setattr(tb, "interpreting", lambda: False)
    assert tb.choose_config(128, (9, 0))[4] == "tma"        # Hopper: TMA tiles, measured on the H200
    assert tb.choose_config(128, (8, 6)) == tb.PRE_HOPPER_CONFIG  # no TMA, fits ~100 KB smem
    monkeypatch.setenv("LVSA_TRITON_CONFIG", "64,32,4,2,tiles")
    assert tb.choose_config(128, (9, 0)) == (64, 32, 4, 2, "tiles")


def test_run_takes_a_plan_for_the_tensors_device_only():
    """Strict plan/run: a plan built elsewhere (here: on the meta device) or a raw mask
    never reaches the kernel; the plan for q's device runs."""
    mask = plan_schedule(6, W=1, n=1, reference=3).mask(1)
    q, k, v, _, _ = _inputs(1, 6, 12, 2, 2, 64, 0, torch.float16, seed=3)
    ip, ix = mask.csr_tensors("meta")
    foreign = tb.TritonPlan(mask, 6, ip, ix)
    with pytest.raises(ValueError, match="plan is on meta"):
        tb.block_sparse_attention(foreign, q, k, v, config=(16, 16, 4, 1, "span"))
    with pytest.raises(TypeError, match="TritonPlan"):
        tb.block_sparse_attention(mask, q, k, v, config=(16, 16, 4, 1, "span"))
    out = tb.block_sparse_attention(tb.plan_for(mask, q.device), q, k, v,
                                    config=(16, 16, 4, 1, "span"))
    assert _err(out, _expect(mask, q, k, v, None, None)) < TOL[torch.float16]


@pytest.mark.parametrize("rows,config", [((0, 50), (16, 16, 4, 1, "span")), ((47, 131), (16, 16, 4, 1, "tiles")),
                                         ((100, 108), (32, 32, 4, 1, "gather"))])
def test_query_rows_match_the_rows_of_the_full_call(rows, config):
    """Sequence parallelism: q holds rows [lo, hi) only (frames cut); every row is written
    and equals the reference's row."""
    T, P, H, Hkv, D, B, L = 9, 20, 2, 1, 64, 2, 6
    mask = plan_schedule(T, W=1, n=1, reference=4).mask(1)
    q, k, v, tk, tv = _inputs(B, T, P, H, Hkv, D, L, torch.float16, seed=5)
    lo, hi = rows
    plan = tb.TritonBackend().plan(mask, Problem.from_tensors(q[:, lo:hi], k, mask, tk, q_rows=rows))
    out = torch.full_like(q[:, lo:hi], float("nan"))
    tb.block_sparse_attention(plan, q[:, lo:hi].contiguous(), k, v, tk, tv, None, config=config, out=out)
    assert torch.isfinite(out).all(), "some output row was not written"
    assert _err(out, _expect(mask, q, k, v, tk, tv)[:, lo:hi]) < TOL[torch.float16]


def test_tile_tables_first_built_under_inference_mode_serve_every_later_call():
    """The plan's tile tables are built on first use, so generation under
    torch.inference_mode() makes them inference tensors; they stay cached and are only
    ever kernel pointer arguments (never written, never seen by autograd), so later calls
    under no_grad or with inputs that require grad read them unchanged."""
    T, P, H, D = 6, 20, 2, 64
    mask = plan_schedule(T, W=1, n=1, reference=3).mask(2)
    q, k, v, _, _ = _inputs(1, T, P, H, H, D, 0, torch.float16, seed=13)
    plan, cfg = tb.plan_for(mask, q.device), (16, 16, 4, 1, "tiles")
    with torch.inference_mode():
        want = tb.block_sparse_attention(plan, q, k, v, config=cfg)
    (tables,) = plan._tiles.values()
    with torch.no_grad():
        assert torch.equal(tb.block_sparse_attention(plan, q, k, v, config=cfg), want)
    got = tb.block_sparse_attention(plan, q.clone().requires_grad_(True), k, v, config=cfg)
    assert torch.equal(got, want)
    (again,) = plan._tiles.values()
    assert again is tables  # the same cached tables, not rebuilt
    assert _err(want, _expect(mask, q, k, v, None, None)) < TOL[torch.float16]
