"""The fa4 backend on the CPU: its tile tables against the token-level mask, and its
plan/run through a stand-in of FlashAttention-4's documented block-sparse forward
(tests/fa4_standin.py) against the reference (ragged P, text, GQA, batch 2, query rows).
The CuTe-DSL kernel and its mask_mod run on the H200 (benchmarks/verify_fa4.sh)."""
import pytest
import torch

from lvsa import testing
from lvsa.backend import Problem
from lvsa.backends.reference import ReferenceBackend
from lvsa.schedule import plan_schedule
from lvsa_cuda import fa4_backend as fa

from fa4_standin import fake_fa4  # noqa: F401 - fixture


def _expand(t: fa.TileTables, n: int, S: int, kind: str = "table") -> torch.Tensor:
    """Token-level picture of the tables: full tiles all True, partial tiles mask_mod ``kind``
    (its torch twin, with the tables' constants and aux tensors)."""
    tm, tn = t.tile
    out = torch.zeros(n, S, dtype=torch.bool)
    aux, mod = t.aux(kind), fa.torch_mask_mod(kind, t.P, t.r)
    for m in range(t.mask_cnt.shape[-1]):
        rows = torch.arange(m * tm, min((m + 1) * tm, n))
        for j in t.full_idx[0, 0, m, :int(t.full_cnt[0, 0, m])].tolist():
            out[rows[0]:rows[-1] + 1, j * tn:min((j + 1) * tn, S)] = True
        for j in t.mask_idx[0, 0, m, :int(t.mask_cnt[0, 0, m])].tolist():
            cols = torch.arange(j * tn, min((j + 1) * tn, S))
            out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = mod(rows, cols, aux)
    return out


@pytest.mark.parametrize("kind", fa.MASK_KINDS)
@pytest.mark.parametrize("T,P,tile,rows,mode", [
    (5, 1560, (128, 128), None, 1),       # Wan's P (not a multiple of any tile), FA4's tile
    (7, 12, (8, 4), (17, 61), 1),         # query rows cut inside frames
    (6, 5, (8, 8), None, 0),              # tiles wider than a frame (up to 3 frames per tile)
    (9, 13, (16, 16), (0, 117), 2),
    (8, 10, (16, 8), (35, 80), 1),        # rows start and end mid-frame, tiles wider than a frame
])
def test_tile_tables_reproduce_the_token_mask(T, P, tile, rows, mode, kind):
    mask = plan_schedule(T, W=1, n=1, reference=3).mask(mode)
    S = T * P
    lo, hi = rows or (0, S)
    t = fa.tile_tables(mask, P, rows, tile)
    want = mask.to_dense("token", tokens_per_frame=P)[lo:hi]
    assert torch.equal(_expand(t, hi - lo, S, kind), want)
    tm, tn = tile
    # full tiles are entirely attended, partial tiles mixed, absent tiles entirely masked
    for m in range(t.full_cnt.shape[-1]):
        r = slice(m * tm, min((m + 1) * tm, hi - lo))
        listed = set(t.full_idx[0, 0, m, :int(t.full_cnt[0, 0, m])].tolist())
        part = set(t.mask_idx[0, 0, m, :int(t.mask_cnt[0, 0, m])].tolist())
        assert not listed & part
        for j in range(-(-S // tn)):
            block = want[r, j * tn:min((j + 1) * tn, S)]
            if j in listed:
                assert block.all()
            elif j in part:
                assert block.any() and not block.all()
            else:
                assert not block.any()
    full, partial, total = t.counts
    assert total == t.full_cnt.shape[-1] * -(-S // tn) and full + partial <= total


def test_the_div_frame_mask_always_has_one_unit_stride():
    """FA4 needs one stride-1 dimension in an aux tensor: a one-frame sequence of exactly one
    key tile would make a [1, 1] table (both strides 1); its columns are padded to two."""
    mask = plan_schedule(1, W=1, n=1, reference=1).mask(0)
    t = fa.tile_tables(mask, 128)
    assert t.allowed_div.shape == (1, 2) and t.allowed_div.stride() == (2, 1)
    assert t.allowed_div.tolist() == [[1, 0]]


def test_tables_at_wan_size_are_mostly_full_tiles():
    """Wan 1.3B T_lat 81 (P = 1560): 128 x 128 tiles that ignore frame boundaries leave only
    the tiles cut by a boundary of the attended set to the mask_mod."""
    mask = plan_schedule(81, W=3, n=1, reference=21).mask(0)
    t = fa.tile_tables(mask, 1560)
    full, partial, total = t.counts
    run = full + partial
    assert abs(run / total - mask.density()) < 0.02
    assert partial / run < 0.10


def _per_tile_reference(mask, P, rows, tile):
    """The tables tile by tile from the frame mask: per (query tile, key tile) the frames
    each touches decide full / partial / absent; each row lists its key tiles ascending,
    then the others ascending, cut to the widest row (at least 1)."""
    A = mask.to_dense("frame")
    S = mask.num_frames * P
    lo, hi = rows or (0, S)
    tm, tn = tile
    M, N = -(-(hi - lo) // tm), -(-S // tn)
    lists = {"full": [], "mask": []}
    for m in range(M):
        r0, r1 = lo + m * tm, min(lo + (m + 1) * tm, hi) - 1
        fq = list(range(r0 // P, r1 // P + 1))
        kinds = []
        for j in range(N):
            fk = list(range(j * tn // P, (min((j + 1) * tn, S) - 1) // P + 1))
            block = A[fq][:, fk]
            kinds.append("full" if block.all() else "mask" if block.any() else None)
        for kind in lists:
            lists[kind].append([j for j in range(N) if kinds[j] == kind])
    out = {}
    for kind, per_row in lists.items():
        width = max(1, max(len(x) for x in per_row))
        out[f"{kind}_cnt"] = torch.tensor([len(x) for x in per_row], dtype=torch.int32)[None, None]
        out[f"{kind}_idx"] = torch.tensor(
            [(x + [j for j in range(N) if j not in x])[:width] for x in per_row], dtype=torch.int32)[None, None]
    full = sum(len(x) for x in lists["full"])
    return out, (full, sum(len(x) for x in lists["mask"]), M * N)


#: the table builder runs on the device of the problem: every device this machine has
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,P,tile,rows,W,offset", [
    (9, 37, (16, 8), None, 1, 1),        # P not a multiple of either tile side
    (12, 5, (8, 16), (7, 53), 2, 3),     # tiles spanning up to 4 frames, rows cut inside frames
    (7, 128, (128, 128), None, 1, 0),    # P equal to the tile
    (20, 50, (64, 32), (100, 999), 3, 2),
    (4, 3, (128, 128), None, 0, 0),      # one tile holds the whole sequence
])
def test_tables_on_each_device_match_a_per_tile_reference(device, T, P, tile, rows, W, offset):
    mask = plan_schedule(T, W=W, n=1, reference=3).mask(offset)
    t = fa.tile_tables(mask, P, rows, tile, device=device)
    want, counts = _per_tile_reference(mask, P, rows, tile)
    for name, ref in want.items():
        got = getattr(t, name)
        assert got.device.type == device and got.dtype == torch.int32 and got.is_contiguous(), name
        assert torch.equal(got.cpu(), ref), name
    assert t.counts == counts
    cpu = fa.tile_tables(mask, P, rows, tile)     # the CPU build: identical, bit for bit
    for name in fa.TileTables.TENSORS:
        assert torch.equal(getattr(t, name).cpu(), getattr(cpu, name)), name


def test_plan_builds_the_tables_on_the_problem_device(monkeypatch):
    """A CUDA problem's tables are built on its GPU (no CPU build and copy)."""
    seen = []
    real = fa.tile_tables

    def spy(mask, P, q_rows=None, tile=fa.TILE, device=None):
        seen.append((torch.device(device), tile))
        return real(mask, P, q_rows, tile)

    monkeypatch.setattr(fa, "tile_tables", spy)
    mask = plan_schedule(9, W=1, n=1, reference=3).mask(0)
    fa.FA4Backend().plan(mask, _problem(device=torch.device("cuda", 1)))
    fa.FA4Backend().plan(mask, _problem(device=torch.device("cuda", 0), compute_capability=(10, 0)))
    fa.FA4Backend().plan(mask, _problem(device_kind="cpu", device=None, compute_capability=None))
    assert seen == [(torch.device("cuda", 1), (128, 128)), (torch.device("cuda", 0), (256, 128)),
                    (torch.device("cpu"), (128, 128))]


from cuda_problems import ROW_CASES, h200_problem as _problem, query_rows_case  # noqa: E402


def test_reasons(monkeypatch):
    be = fa.FA4Backend()
    monkeypatch.setattr(be, "missing_packages", lambda: ["flash_attn"])
    (r,) = be.not_supported_reasons(_problem())
    assert "FlashAttention-4 is not installed" in r and "pip install lvsa-cuda[fa4]" in r
    monkeypatch.setattr(be, "missing_packages", lambda: [])
    # FlashAttention 2's flash_attn has no flash_attn.cute: FA4 is not installed, FA2 named
    monkeypatch.setattr(fa, "_import_error", lambda: "ModuleNotFoundError: No module named 'flash_attn.cute'")
    monkeypatch.setattr(fa, "dist_version", lambda *d: "2.8.3" if d == ("flash-attn",) else "?")
    (r,) = be.not_supported_reasons(_problem())
    assert "FlashAttention-4 is not installed" in r and "flash-attn 2.8.3 (FlashAttention 2" in r
    # FA4 installed but its CuTe DSL runtime missing: broken, with what it needs
    monkeypatch.setattr(fa, "_import_error", lambda: "ModuleNotFoundError: No module named 'tvm_ffi'")
    (r,) = be.not_supported_reasons(_problem())
    assert "is installed but flash_attn.cute fails to import (ModuleNotFoundError: No module named 'tvm_ffi')" in r
    assert "nvidia-cutlass-dsl" in r and "apache-tvm-ffi" in r and "; " not in r  # "; " splits log lines
    monkeypatch.setattr(fa, "_import_error", lambda: "ImportError: libcuda.so.1")
    r = be.not_supported_reasons(_problem(compute_capability=(8, 0)))
    assert any("fails to import (ImportError: libcuda.so.1)" in x for x in r)
    # one architecture reason (Ampere is below, sm_120 is newer: neither has FA4's forward)
    assert [x for x in r if "sm_80" in x or "compute capability" in x] == [
        "FA4's block-sparse forward runs on Hopper (sm_90) and Blackwell (sm_100), this GPU is sm_80: "
        "flashinfer and triton are the fast backends there"]
    monkeypatch.setattr(fa, "_import_error", lambda: None)
    assert any("sm_120" in x for x in be.not_supported_reasons(_problem(compute_capability=(12, 0))))
    assert be.not_supported_reasons(_problem(compute_capability=(9, 0))) == []
    assert be.not_supported_reasons(_problem(compute_capability=(10, 0))) == []


def test_compile_key_follows_what_fa4_compiles_for(monkeypatch):
    """FA4 compiles per dtype, head dim, LSE (text), GQA ratio, the tables' broadcast
    pattern (batch 1 or more, one head or more) and architecture: so does the key
    (measured on the H200: batch 2 after batch 1 compiled again, ~5 s)."""
    monkeypatch.setattr(fa, "dist_version", lambda *d: "4.0.0b36")
    be = fa.FA4Backend()
    key = lambda **kw: be.compile_key(_problem(**kw))  # noqa: E731
    assert key(batch=1, text_len=0) == "bfloat16 head_dim=128 P=1560 sm_90 fa4 4.0.0b36"
    assert key(batch=2, text_len=256) == "bfloat16 head_dim=128 P=1560 +text batch>1 sm_90 fa4 4.0.0b36"
    # the div mask_mod's constants: tokens per frame, and the query rows' offset inside a frame
    assert "P=1350" in key(seq_len=9 * 1350, P=1350)
    assert key(q_rows=(3 * 1560, 9 * 1560)) == key() and " r=7 " in key(q_rows=(1567, 9 * 1560))
    monkeypatch.setattr(fa, "MASK_KIND", "table")
    assert key(seq_len=9 * 1350, P=1350) == key() and "P=" not in key()
    assert key(batch=3) == key(batch=2) != key(batch=1)
    assert "gqa4" in key(num_heads=16, num_kv_heads=4) and key(num_heads=16, num_kv_heads=4) != key(
        num_heads=16, num_kv_heads=2)
    assert "heads=1" in key(num_heads=1, num_kv_heads=1)
    assert key(compute_capability=(10, 0)) != key()


def test_blackwell_tables_use_fa4s_256_row_query_blocks():
    """FA4's SM100 forward runs two 128-row query tiles per CTA: its block sparsity takes
    256-row query blocks there (Blackwell is untested: the tables are what FA4 asks for)."""
    be = fa.FA4Backend()
    assert be.tile_for(_problem(compute_capability=(9, 0))) == (128, 128)
    assert be.tile_for(_problem(compute_capability=(10, 0))) == (256, 128)
    assert be.tile_for(_problem(device_kind="cpu", device=None, compute_capability=None)) == (128, 128)
    be.tile = (8, 8)
    assert be.tile_for(_problem(compute_capability=(10, 3))) == (16, 8)


@pytest.mark.parametrize("kind", fa.MASK_KINDS)
@pytest.mark.parametrize("B,H,Hkv,L,D,tile", [(2, 4, 2, 5, 16, (8, 8)), (1, 2, 2, 0, 8, (128, 128)),
                                              (2, 2, 1, 3, 16, (16, 8))])
def test_plan_and_run_against_the_reference(fake_fa4, monkeypatch, B, H, Hkv, L, D, tile, kind):
    monkeypatch.setattr(fa, "MASK_KIND", kind)
    T, P = 7, 12
    mask = plan_schedule(T, 1, 1, 3).mask(1)
    g = torch.Generator().manual_seed(B * 10 + H + D)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(B, T * P, H, D), r(B, T * P, Hkv, D), r(B, T * P, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    be = fa.FA4Backend()
    be.tile = tile
    plan = be.plan(mask, Problem.from_tensors(q, k, mask, tk))
    out = be.run(plan, q, k, v, tk, tv)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, None), q, k, v, tk, tv)
    assert torch.allclose(out, ref, atol=2e-5)
    assert fake_fa4[-1]["block_size"] == tile
    out2 = be.run(plan, q, k, v, tk, tv, scale=0.1)
    ref2 = ReferenceBackend().run(ReferenceBackend().plan(mask, None), q, k, v, tk, tv, scale=0.1)
    assert torch.allclose(out2, ref2, atol=2e-5)


@pytest.mark.parametrize("kind", fa.MASK_KINDS)
@pytest.mark.parametrize("rows,L", ROW_CASES)
def test_query_rows(fake_fa4, monkeypatch, rows, L, kind):
    monkeypatch.setattr(fa, "MASK_KIND", kind)
    mask, q, k, v, tk, tv, ref = query_rows_case(L)
    lo, hi = rows
    be = fa.FA4Backend()
    be.tile = (8, 8)
    plan = be.plan(mask, Problem.from_tensors(q[:, lo:hi], k, mask, tk, q_rows=rows))
    assert plan.tables.mask_cnt.shape[-1] == -(-(hi - lo) // 8)     # only the rows q holds
    out = be.run(plan, q[:, lo:hi], k, v, tk, tv)
    assert out.shape == q[:, lo:hi].shape and torch.allclose(out, ref[:, lo:hi], atol=2e-5)


def test_fa4_conformance_on_the_standin(fake_fa4):
    be = fa.FA4Backend()
    be.tile = (8, 8)
    results = testing.check_backend(be, "cpu", ignore_device=True)
    bad = [x.line() for x in results if x.status != "pass"]
    assert results and not bad, "\n".join(bad)


@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,L,D,scale", [(2, 40, 40, 4, 2, 5, 16, None), (1, 17, 33, 2, 2, 0, 8, 0.3)])
def test_dense_is_dense_attention_through_fa4s_dense_forward(fake_fa4, B, Sq, Sk, H, Hkv, L, D, scale):
    """FA4's dense forward (the dense baseline of lvsa bench): FA4 called with no mask and
    no block sparsity over the video + text keys; the same function as lvsa's dense path."""
    from lvsa.ops import dense_attention

    g = torch.Generator().manual_seed(Sq + L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(B, Sq, H, D), r(B, Sk, Hkv, D), r(B, Sk, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    out = fa.FA4Backend().dense(q, k, v, tk, tv, scale)
    (call,) = fake_fa4
    assert call["dense"] and call["k"] == (B, Sk + L, Hkv, D)
    assert call["scale"] == pytest.approx(scale or D ** -0.5)
    want = dense_attention(q, k, v, tk, tv, scale)
    assert out.shape == q.shape and torch.allclose(out, want, atol=2e-5)


def test_dense_reasons_are_the_backends_own(monkeypatch):
    """Where FA4's dense forward cannot run, the reasons are the fa4 backend's, word for word
    (package, import, GPU architecture), whatever the frame layout."""
    be = fa.FA4Backend()
    monkeypatch.setattr(fa, "_import_error", lambda: None)
    monkeypatch.setattr(be, "missing_packages", lambda: [])
    assert be.dense_reasons(_problem(T=7, seq_len=9 * 1560 + 256)) == []   # not a multiple of T: no matter
    arch = be.not_supported_reasons(_problem(compute_capability=(8, 0)))
    assert be.dense_reasons(_problem(compute_capability=(8, 0))) == arch and "sm_80" in arch[0]
    monkeypatch.setattr(be, "missing_packages", lambda: ["flash_attn"])
    assert be.dense_reasons(_problem()) == be.not_supported_reasons(_problem()) == be.availability_reasons()


# ------------------------------------------------------------ the real kernel (H200)
def _real_fa4():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10):
        return "needs a Hopper/Blackwell GPU (benchmarks/verify_fa4.sh runs it on the H200)"
    err = fa._import_error()
    return f"flash-attn-4 does not import here ({err})" if err else None


@pytest.mark.skipif(_real_fa4() is not None, reason=str(_real_fa4()))
@pytest.mark.parametrize("D,H,Hkv,B,T,P,L,rows,dtype", [
    (128, 12, 12, 1, 9, 1560, 0, None, torch.bfloat16),      # Wan's frame size
    (128, 16, 16, 2, 7, 1560, 256, None, torch.bfloat16),    # HunyuanVideo-like text, batch 2
    (64, 8, 2, 2, 6, 333, 7, None, torch.float16),           # GQA, head_dim 64, ragged P
    (128, 4, 4, 1, 8, 1000, 5, (1500, 6100), torch.bfloat16),  # query rows cut inside frames
])
@pytest.mark.parametrize("kind", fa.MASK_KINDS)
def test_real_kernel_against_the_reference(D, H, Hkv, B, T, P, L, rows, dtype, kind, monkeypatch):
    monkeypatch.setattr(fa, "MASK_KIND", kind)
    dev = "cuda"
    mask = plan_schedule(T, W=1, n=1, reference=3).mask(1)
    g = torch.Generator(device=dev).manual_seed(T * P + D)
    r = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dtype)  # noqa: E731
    S = T * P
    q, k, v = r(B, S, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    lo, hi = rows or (0, S)
    be = fa.FA4Backend()
    plan = be.plan(mask, Problem.from_tensors(q[:, lo:hi], k, mask, tk, q_rows=rows))
    out = be.run(plan, q[:, lo:hi], k, v, tk, tv)
    ref = ReferenceBackend()
    want = ref.run(ref.plan(mask, None), q.float(), k.float(), v.float(),
                   None if tk is None else tk.float(), None if tv is None else tv.float())[:, lo:hi]
    atol, rtol = be.tolerance(dtype)
    err = (out.float() - want).abs().max().item()
    assert torch.allclose(out.float(), want, atol=atol, rtol=rtol), f"max abs error {err}"


@pytest.mark.skipif(_real_fa4() is not None, reason=str(_real_fa4()))
@pytest.mark.parametrize("D,H,Hkv,B,S,L,dtype", [(128, 12, 12, 1, 9 * 1560, 0, torch.bfloat16),
                                                (128, 16, 16, 2, 7 * 1560, 256, torch.bfloat16),
                                                (64, 8, 2, 2, 6 * 333, 7, torch.float16)])
def test_real_kernel_dense_against_sdpa(D, H, Hkv, B, S, L, dtype):
    """FA4's dense forward (lvsa bench's FA4 dense baseline) is full attention over video + text."""
    from lvsa.ops import dense_attention

    g = torch.Generator(device="cuda").manual_seed(S + D)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v = r(B, S, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    out = fa.FA4Backend().dense(q, k, v, tk, tv)
    want = dense_attention(*(None if t is None else t.float() for t in (q, k, v, tk, tv)))
    atol, rtol = fa.FA4Backend().tolerance(dtype)
    assert torch.allclose(out.float(), want, atol=atol, rtol=rtol), (out.float() - want).abs().max().item()


# ------------------------------------------------------------ auto selection on the H200
#: the H200 shapes with fa4 in the committed results: (name, heads, head_dim, text, T, P, ref)
H200_MEASURED = [
    ("wan1.3b-t81", 12, 128, 0, 81, 1560, 21),
    ("wan1.3b-t121", 12, 128, 0, 121, 1560, 21),
    ("wan14b-t81", 40, 128, 0, 81, 1560, 21),
    ("hy-t65-text", 16, 128, 256, 65, 1560, 33),
    ("cogvideox-5b-t51", 48, 64, 226, 51, 1350, 13),
    ("wan1.3b-t21 (a full mask)", 12, 128, 0, 21, 1560, 21),
]


@pytest.fixture
def h200(fresh_plugins, monkeypatch):
    """The real registry on a (described) H200, FA4 importable: selection reads the shipped
    NVIDIA H200 cost table."""
    from lvsa import costs

    monkeypatch.setattr(costs, "device_name", lambda device: "NVIDIA H200")
    costs.tables.cache_clear()
    monkeypatch.setattr(fa.FA4Backend, "missing_packages", lambda self: [])
    monkeypatch.setattr(fa, "_import_error", lambda: None)
    for var in ("LVSA_BACKEND", "LVSA_AUTOTUNE", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    yield
    costs.tables.cache_clear()


def _h200_problem(heads, D, text, T, P, batch=1):
    return Problem("cuda", torch.bfloat16, batch, T * P, heads, heads, D, text_len=text, T=T, P=P,
                   compute_capability=(9, 0), device=torch.device("cuda", 0))


def _select(heads, D, text, T, P, ref):
    from lvsa import costs, dispatch
    from lvsa.config import Config

    density = plan_schedule(T, W=3, n=1, reference=ref).mask(0).density()
    problem = _h200_problem(heads, D, text, T, P)
    sel = dispatch.select_backend(problem, density=density, config=Config.load(env={}))
    return sel, costs.table_row("NVIDIA H200", costs.shape_class(heads, D, text, density))


def test_fa4_ranks_first_on_cuda(h200):
    from lvsa import dispatch

    assert dispatch.auto_order("cuda")[:3] == ["fa4", "flashinfer", "triton"]


@pytest.mark.parametrize("name,heads,D,text,T,P,ref", H200_MEASURED)
def test_auto_picks_fa4_where_the_h200_table_measured_it_fastest(h200, name, heads, D, text, T, P, ref):
    sel, row = _select(heads, D, text, T, P, ref)
    assert "fa4" in row["costs"] and min(row["costs"], key=row["costs"].get) == "fa4"
    assert sel.name == "fa4"
    assert sel.why.startswith("cost table costs-nvidia-h200.json (NVIDIA H200, ")
    assert f"fa4 {row['costs']['fa4']:.3f}" in sel.why


@pytest.mark.parametrize("name,heads,D,text,T,P,ref", H200_MEASURED)
def test_without_fa4_auto_takes_the_next_cheapest_measured(h200, monkeypatch, name, heads, D, text, T, P, ref):
    from lvsa_cuda.flashinfer_backend import FlashInferBackend

    monkeypatch.setattr(fa.FA4Backend, "missing_packages", lambda self: ["flash_attn"])
    monkeypatch.setattr(FlashInferBackend, "availability_reasons", lambda self: [])  # as on the H200
    sel, row = _select(heads, D, text, T, P, ref)
    assert "FlashAttention-4 is not installed" in sel.refused["fa4"][0]
    able = {b: c for b, c in row["costs"].items() if b in ("flashinfer", "triton", "reference")}
    assert sel.name == min(able, key=able.get) and sel.why.startswith("cost table costs-nvidia-h200.json")


def test_a_class_the_table_has_without_fa4_goes_by_rank_and_says_so(h200):
    """HunyuanVideo T49 + text (near dense) was measured before fa4 existed: its row has no fa4,
    so the declared rank decides (fa4 first) and the reason says the row lacks it."""
    sel, row = _select(16, 128, 256, 49, 1560, 33)
    assert row is not None and "fa4" not in row["costs"]
    assert sel.name == "fa4"
    assert sel.why.startswith("declared rank (NVIDIA H200; cost table costs-nvidia-h200.json has a row for ")
    assert "lacks fa4, the first in rank (" in sel.why


def test_info_shows_fa4_chosen_and_why_on_an_h200(h200, monkeypatch, capsys):
    from lvsa import cli, devices

    gpu = devices.DeviceInfo("cuda", 0, "NVIDIA H200", (9, 0), 143 * 2**30)
    monkeypatch.setattr(devices, "all_devices", lambda: [gpu, devices.DeviceInfo("cpu", None, "CPU")])
    monkeypatch.setattr(devices, "default_device_kind", lambda: "cuda")
    assert cli.main(["info", "--json"]) == 0
    import json
    d = json.loads(capsys.readouterr().out)
    assert d["auto_selects"] == "fa4" and d["auto_order"][0] == "fa4"
    assert d["selection_why"].startswith("cost table costs-nvidia-h200.json (NVIDIA H200, density 0.20-0.35")
    row = next(b for b in d["backends"] if b["name"] == "fa4")
    assert row["available"] and row["compiles"] and "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1" in row[
        "compile_in_memory"]
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto selects: fa4" in out and "  why: cost table costs-nvidia-h200.json (NVIDIA H200" in out
    assert "compiles on first use (once per process: FA4 keeps its kernels in memory" in out


def test_warmup_builds_fa4_for_batch_one_and_more(fresh_plugins, fake_fa4, monkeypatch, capsys):
    """lvsa warmup builds each FA4 kernel a generation can need: batch 1 and batch > 1 are two
    (FA4 keys on the tables' broadcast pattern), for the given tokens per frame (a constant of
    the mask_mod: each P its own kernel), and it says they last only in this process."""
    import json

    from lvsa import cli

    monkeypatch.setattr(fa.FA4Backend, "devices", ("cuda", "cpu"))  # the stand-in runs on the CPU
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    assert cli.main(["warmup", "--backends", "fa4", "--device", "cpu", "--model", "wan2.1-t2v-1.3b",
                     "--tokens-per-frame", "16", "24", "--json"]) == 0
    out, err = capsys.readouterr()
    rec = next(r for r in json.loads(out)["backends"] if r["backend"] == "fa4")
    assert len(rec["built"]) == 4 and not rec["failed"]
    assert [("batch>1" in k, "P=16" in k) for k in rec["built"]] == [
        (False, True), (True, True), (False, False), (True, False)]
    assert len(fake_fa4) == 4                                          # one kernel call per key
    assert "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1" in rec["in_memory"]
    for key in rec["built"]:
        assert f"[LVSA] compiling fa4 for {key}..." in err
    assert cli.main(["warmup", "--backends", "fa4", "--device", "cpu", "--model", "wan2.1-t2v-1.3b",
                     "--tokens-per-frame", "16"]) == 0
    assert "fa4: built in this process only, the next one compiles again: FA4 keeps" in capsys.readouterr().out


def test_a_copy_for_a_strided_head_dim_is_said(fake_fa4, capsys):
    """q with a non-unit last stride is copied for FA4, with a warning line, and the
    result is still exact."""
    T, P, H, D = 5, 6, 2, 16
    mask = plan_schedule(T, 1, 1, 2).mask(1)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, T * P, H, D, 2, generator=g)[..., 0]   # last stride 2
    k, v = (torch.randn(1, T * P, H, D, generator=g) for _ in range(2))
    assert q.stride(-1) != 1
    be = fa.FA4Backend()
    be.tile = (8, 8)
    out = be.run(be.plan(mask, Problem.from_tensors(q, k, mask)), q, k, v)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, None), q, k, v)
    assert torch.allclose(out, ref, atol=2e-5)
    assert "fa4: q not contiguous in head_dim, copied" in capsys.readouterr().err


def test_run_refuses_a_foreign_plan_or_another_shape(fake_fa4):
    """A plan reused on tensors of another head count, head dim or dtype raises (it would read
    tables made for another problem); the batch is free (tables broadcast over it)."""
    mask, q, k, v, tk, tv, ref = query_rows_case(0)
    be = fa.FA4Backend()
    be.tile = (8, 8)
    plan = be.plan(mask, Problem.from_tensors(q, k, mask, None))
    assert torch.allclose(be.run(plan, q[:1], k[:1], v[:1]), ref[:1], atol=2e-5)   # batch 1 of a batch-2 plan
    with pytest.raises(ValueError, match=r"fa4 plan was made for heads=2/1 head_dim=16"):
        be.run(plan, q.repeat(1, 1, 2, 1), k, v)
    with pytest.raises(ValueError, match="fa4 plan was made for"):
        be.run(plan, q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match=r"fa4.run\(\) takes the FA4Plan from fa4.plan"):
        be.run(object(), q, k, v)
