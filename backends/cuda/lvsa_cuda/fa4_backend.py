"""The ``fa4`` backend: FlashAttention-4's CuTe-DSL forward driven by lvsa's frame mask.

Why another kernel
------------------
FlashInfer (one block row per latent frame) and lvsa's Triton kernel both start a query
tile at every frame boundary: with ``P = 1560`` tokens per frame a 128-row tile sequence
ends in a 24-row tile, so 6 % of the tiles' rows are padding, and their per-tile speed is
below cuDNN's dense kernel. FlashAttention-4 (``pip install flash-attn-4``; Hopper and
Blackwell) takes FlexAttention-style block sparsity over its own 128 x 128 tiles: the
query and key tiles ignore frame boundaries, every tile runs at the dense kernel's speed,
and only the tiles cut by a frame boundary evaluate a per-element ``mask_mod``.

Layout
------
:func:`tile_tables` turns the frame mask into, per query tile, the list of key tiles it
needs: *full* tiles (every (row, key) pair inside is attended: no mask) and *partial*
tiles (some are; the kernel calls :func:`mask_mod` for each element). The tables do not
depend on batch or heads (stride-0 broadcast) and are built once per (mask, rows) with a
few dozen torch ops on the problem's device (the GPU for a CUDA problem: 3-6 ms on the H200;
10 ms on a 2-core CPU at Wan's T_lat 81, ``benchmarks/bench_planner.py``) from a
summed-area table of the frame mask: no token-level mask is ever built. The ``mask_mod``
(:data:`MASK_KIND` ``div``) finds the query row's and the key's frames by integer division
by the tokens per frame ``P``, a compile-time constant (a multiply-high, no memory access),
and reads the frame mask, the one small int32 table passed as FA4's ``aux_tensors``. So one
compiled kernel serves every schedule and length with the same ``P`` (FA4 compiles per
:meth:`FA4Backend.compile_key`: dtype, head dim, text, GQA ratio, batch 1 or more, one head
or more, ``P`` and the query rows' offset in their frame, GPU: so sequence parallelism whose
ranks start mid-frame compiles one kernel per distinct offset, and a new resolution one per P). The first mask_mod (``table``: the two frames from per-token tables, three loads per
element) stays selectable for ``benchmarks/fa4_mask_ab.py``.

Text tokens are merged exactly from FA4's natural-log LSE with the same in-place merge
kernel as the flashinfer backend; query rows ``[lo, hi)`` (sequence parallelism) start
the frame mask's rows at ``lo``'s frame and add ``lo % P`` to the row index, nothing else.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from lvsa_cuda import CudaBackend, check_plan, concrete_device, device_guard, dist_version, import_error
from lvsa.hookspecs import hookimpl
from lvsa.mask import BlockMask
from lvsa.ops import append_text, default_scale

LN2 = math.log(2.0)
#: FA4's SM90 forward tile for head_dim 64/128 under block sparsity (query rows, keys)
TILE = (128, 128)


@dataclass
class TileTables:
    """FA4 block-sparse tables of one (mask, query rows): ``[1, 1, M]`` counts and
    ``[1, 1, M, width]`` key-tile indices (left-packed, ascending), plus the aux tables
    the ``mask_mod`` reads."""

    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    q_frame: torch.Tensor   # [M * tile_m] int32: frame of each (padded) query row
    k_frame: torch.Tensor   # [N * tile_n] int32: frame of each (padded) key
    allowed: torch.Tensor   # [T, T] int32: the frame mask
    #: ``[Fq, Fk]`` int32: the frame mask as the ``div`` mask_mod indexes it, row ``i`` the
    #: query frame ``lo // P + i``, zero past the mask (padded rows and keys land there)
    allowed_div: torch.Tensor
    tile: Tuple[int, int]
    #: tiles run: full, partial (a mask_mod per element), and all tiles of the grid
    counts: Tuple[int, int, int]
    #: tokens per frame and the first query row's offset in its frame (``lo % P``): the
    #: ``div`` mask_mod's compile-time constants
    P: int = 0
    r: int = 0

    TENSORS = ("mask_cnt", "mask_idx", "full_cnt", "full_idx", "q_frame", "k_frame", "allowed", "allowed_div")

    def to(self, device) -> "TileTables":
        moved = {k: getattr(self, k).to(device) for k in self.TENSORS}
        return TileTables(**moved, tile=self.tile, counts=self.counts, P=self.P, r=self.r)

    def aux(self, kind: str) -> List[torch.Tensor]:
        """The ``aux_tensors`` of mask_mod ``kind`` (:data:`MASK_KINDS`)."""
        return [self.allowed_div] if kind == "div" else [self.q_frame, self.k_frame, self.allowed]


def _stable_partition(flag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flag`` ``[R, N]``: the number of set columns and the column order of a
    stable partition (set columns ascending, then the others ascending: what a stable
    ``argsort(~flag)`` gives), in O(R * N) elementwise ops and one scatter."""
    cnt = flag.sum(1)
    pos = torch.where(flag, flag.cumsum(1) - 1, (~flag).cumsum(1) - 1 + cnt[:, None])
    cols = torch.arange(flag.shape[1], device=flag.device).expand_as(pos)
    return cnt, torch.empty_like(pos).scatter_(1, pos, cols)


def tile_tables(mask: BlockMask, P: int, q_rows: Optional[Tuple[int, int]] = None,
                tile: Tuple[int, int] = TILE, device=None) -> TileTables:
    """Block-sparse tables of ``mask`` over ``tile``-sized tiles of the video sequence
    (``T * P`` keys; query rows ``q_rows = [lo, hi)``, default all), built with torch ops
    on ``device`` (default: the CPU; the plan of a CUDA problem builds them on its GPU).

    A tile is *full* when every frame pair it touches is attended, *partial* when some
    are, and absent when none is (counted with a summed-area table of the frame mask).
    Query tiles covering the same frames have the same key-tile lists, so the lists are
    built once per distinct frame range (about ``2 T`` of them) and gathered per tile.
    Each ``*_idx`` row lists its key tiles ascending, then (up to the table width) the
    other key tiles ascending; the kernel reads only the first ``*_cnt``."""
    T = mask.num_frames
    S = T * P
    lo, hi = q_rows if q_rows is not None else (0, S)
    if not 0 <= lo < hi <= S:
        raise ValueError(f"query rows [{lo}, {hi}) are not inside the video sequence [0, {S})")
    dev = torch.device("cpu") if device is None else torch.device(device)
    tm, tn = tile
    n = hi - lo
    M, N = -(-n // tm), -(-S // tn)
    allowed = mask.to_dense("frame").to(device=dev, dtype=torch.int32)
    sat = torch.zeros(T + 1, T + 1, dtype=torch.int32, device=dev)
    sat[1:, 1:] = allowed.cumsum(0).cumsum(1)
    r0 = lo + torch.arange(M, device=dev) * tm
    fq0, fq1 = r0 // P, (torch.clamp(r0 + tm, max=hi) - 1) // P
    c0 = torch.arange(N, device=dev) * tn
    fk0, fk1 = c0 // P, (torch.clamp(c0 + tn, max=S) - 1) // P
    # query tiles by frame range (fq0, fq1): both ascend with the tile, so ranges are runs
    ranges, row_of = torch.unique_consecutive(fq0 * (T + 1) + fq1, return_inverse=True)
    a, b = ranges // (T + 1), ranges % (T + 1)
    # attended frame pairs of each (query range, key tile) rectangle
    col = sat.index_select(0, b + 1) - sat.index_select(0, a)            # [R, T + 1]
    cnt = col.index_select(1, fk1 + 1) - col.index_select(1, fk0)         # [R, N]
    area = (b - a + 1)[:, None] * (fk1 - fk0 + 1)[None, :]
    full = cnt == area
    partial = (cnt > 0) & ~full
    full_n, full_order = _stable_partition(full)
    part_n, part_order = _stable_partition(partial)
    f_w, p_w, f_tot, p_tot = torch.stack([
        full_n.max(), part_n.max(), full_n[row_of].sum(), part_n[row_of].sum()]).tolist()

    def per_tile(count, order, width):
        idx = order[:, :max(width, 1)].to(torch.int32).index_select(0, row_of)
        return count.to(torch.int32)[row_of][None, None], idx[None, None].contiguous()

    full_cnt, full_idx = per_tile(full_n, full_order, f_w)
    mask_cnt, mask_idx = per_tile(part_n, part_order, p_w)
    q_frame = torch.clamp((lo + torch.arange(M * tm, device=dev)) // P, max=T - 1).to(torch.int32)
    k_frame = torch.clamp(torch.arange(N * tn, device=dev) // P, max=T - 1).to(torch.int32)
    f0, r = divmod(lo, P)
    # at least two columns: a [n, 1] table has two unit strides, which FA4 refuses for an aux tensor
    allowed_div = torch.zeros((r + M * tm - 1) // P + 1, max((N * tn - 1) // P + 1, 2), dtype=torch.int32,
                              device=dev)
    rows = allowed[f0:f0 + allowed_div.shape[0]]
    allowed_div[:rows.shape[0], :T] = rows
    return TileTables(mask_cnt, mask_idx, full_cnt, full_idx, q_frame, k_frame,
                      allowed.contiguous(), allowed_div, tile, (f_tot, p_tot, M * N), P, r)


#: the mask_mods lvsa can hand FA4 (each a CuTe function and its torch twin):
#: ``div``    the query row's and the key's frames by unsigned integer division by the
#:            compile-time constant ``P`` (a multiply-high), then one load of the frame mask:
#:            what the backend runs (:data:`MASK_KIND`; 1.01-1.03x ``table`` on the H200,
#:            ``fa4-mask-ab-div-*``);
#: ``table``  three loads: the query row's frame, the key's frame, the frame mask (the first
#:            mask_mod; ``benchmarks/fa4_mask_ab.py`` times the two side by side).
MASK_KINDS = ("div", "table")
MASK_KIND = "div"


def frame_mask_torch(q_idx: torch.Tensor, kv_idx: torch.Tensor, aux, P: int = 0, r: int = 0) -> torch.Tensor:
    """What :func:`mask_mod` computes, in torch: ``allowed[q_frame[q], k_frame[kv]]`` (three
    aux tensors: ``table``), or with one aux tensor (``div``) ``allowed_div[(q + r) // P, kv // P]``
    (the CPU stand-in of FA4 evaluates partial tiles with this)."""
    if len(aux) == 1:
        q, kv = q_idx.long(), kv_idx.long()
        return aux[0][((q + r) // P)[:, None], (kv // P)[None, :]] != 0
    q_frame, k_frame, allowed = aux
    return allowed[q_frame[q_idx.long()].long()[:, None], k_frame[kv_idx.long()].long()[None, :]] != 0


def torch_mask_mod(kind: str = "table", P: int = 0, r: int = 0):
    """The torch twin of :func:`mask_mod` ``(kind, P, r)`` (what FA4's CPU stand-in calls)."""
    return functools.partial(frame_mask_torch, P=P, r=r) if kind == "div" else frame_mask_torch


@functools.lru_cache(maxsize=None)
def mask_mod(kind: str = "table", P: int = 0, r: int = 0):
    """The CuTe-DSL ``mask_mod`` FA4 calls on each element of a partial tile.

    ``table``: three int32 loads (query frame, key frame, frame mask), all cached on chip.
    ``div``: ``(q + r) // P`` and ``kv // P`` in unsigned 32-bit arithmetic (the signed
    division measured 0.97-1.02x ``table``, the unsigned 1.01-1.03x), ``P`` and ``r`` compile-time constants
    (FA4 hashes the closure: one kernel per tokens-per-frame and row offset), then one load
    of the padded frame mask ``[Fq, Fk]``."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    if kind == "div":
        @cute.jit
        def lvsa_frame_mask_div(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
            allowed = aux_tensors[0]
            fq = cutlass.Int32(cutlass.Uint32(m_idx[0] + r) // cutlass.Uint32(P))
            fk = cutlass.Int32(cutlass.Uint32(n_idx[0]) // cutlass.Uint32(P))
            hit = utils.scalar_to_ssa(allowed[fq, fk], cutlass.Int32)
            return hit == utils.scalar_to_ssa(1, cutlass.Int32)

        return lvsa_frame_mask_div

    @cute.jit
    def lvsa_frame_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        q_frame, k_frame, allowed = aux_tensors[0], aux_tensors[1], aux_tensors[2]
        fq = q_frame[m_idx[0]]
        fk = k_frame[n_idx[0]]
        hit = utils.scalar_to_ssa(allowed[fq, fk], cutlass.Int32)
        return hit == utils.scalar_to_ssa(1, cutlass.Int32)

    return lvsa_frame_mask


def kernel():
    """``(flash_attn_func, BlockSparseTensorsTorch, mask_mod)`` of the installed FA4, the
    last a factory ``(kind, P, r) -> mask_mod`` (a test replaces this with a CPU stand-in of
    the documented API and :func:`torch_mask_mod`)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return flash_attn_func, BlockSparseTensorsTorch, mask_mod


def dense_func():
    """FA4's ``flash_attn_func`` for a dense call: no mask, no block sparsity (a test
    replaces this with the CPU stand-in)."""
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def _import_error() -> Optional[str]:
    return import_error("flash_attn.cute")


def _fa4_version() -> str:
    return dist_version("flash-attn-4")


def _not_fa4(err: str) -> bool:
    """``flash_attn.cute`` is absent (FlashAttention 2's ``flash_attn`` without FA4), as
    opposed to FA4 present but broken (a module or library *it* needs is missing)."""
    return err.startswith("ModuleNotFoundError") and (
        "'flash_attn.cute'" in err or "'flash_attn'" in err)


#: what to do when FA4 is installed but does not import (it runs on NVIDIA's CuTe DSL)
FA4_IMPORT_FIX = ("FA4 needs nvidia-cutlass-dsl with its nvidia-cutlass-dsl-libs-* wheels (libs-cu13 for a "
                  "CUDA 13 torch) and apache-tvm-ffi importable: pip install --upgrade flash-attn-4 "
                  "nvidia-cutlass-dsl apache-tvm-ffi, and python -c 'import flash_attn.cute' shows the "
                  "whole error")


@dataclass
class FA4Plan:
    tables: TileTables
    batch: int
    num_frames: int
    tokens_per_frame: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    q_rows: Optional[Tuple[int, int]] = None


class FA4Backend(CudaBackend):
    """FlashAttention-4 (CuTe DSL) block-sparse forward over 128 x 128 tiles."""

    name = "fa4"
    requires = ("flash_attn",)
    install_hint = "pip install lvsa-cuda[fa4]"
    #: first on CUDA: measured faster than flashinfer at every H200 shape (1.01-1.06 of
    #: ideal against 0.90-0.93); auto still goes by the device's cost table where it has one
    priority = {"cuda": 120}
    supports_q_rows = True
    #: FA4's block-sparse forward exists for Hopper (sm_90) and Blackwell (sm_100):
    #: checked in :meth:`extra_reasons` (an sm_120 GPU is newer but has neither)
    min_compute_capability = None
    #: a CuTe-DSL kernel is compiled on first use per :meth:`compile_key`
    compiles = True
    compile_cache_hint = ("FA4 keeps its kernels in memory unless FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 "
                          "(then on disk, FLASH_ATTENTION_CUTE_DSL_CACHE_DIR)")
    #: the tile grid of the tables on sm_90; FA4 runs 128 x 128 (tests use small tiles on the CPU)
    tile = TILE
    description = ("FlashAttention-4 CuTe-DSL forward, FlexAttention-style block sparsity over "
                   "128x128 tiles that ignore frame boundaries, a mask_mod on cut tiles (frames by "
                   "division by the constant P, one frame-mask load); text merged by LSE; "
                   "pip install lvsa-cuda[fa4]")

    @property
    def variant(self) -> str:
        return f"mask_mod={MASK_KIND}"

    def availability_reasons(self):
        if self.missing_packages():
            return [f"FlashAttention-4 is not installed ({self.install_hint}, or pip install flash-attn-4)"]
        err = _import_error()
        if err is None:
            return []
        if _not_fa4(err):
            other = dist_version("flash-attn")
            here = f"flash_attn here is flash-attn {other} (FlashAttention 2, no flash_attn.cute)" \
                if other != "?" else f"flash_attn has no flash_attn.cute ({err})"
            return [f"FlashAttention-4 is not installed: {here} ({self.install_hint}, or pip install "
                    "flash-attn-4: both install side by side)"]
        return [f"flash-attn-4 {_fa4_version()} is installed but flash_attn.cute fails to import ({err}): "
                + FA4_IMPORT_FIX]

    def extra_reasons(self, problem):
        if problem.T and problem.seq_len % problem.T:
            yield f"sequence length {problem.seq_len} is not a multiple of T={problem.T}"
        cc = problem.compute_capability
        if problem.device_kind == "cuda" and (cc is None or cc[0] not in (9, 10)):
            have = f"sm_{cc[0]}{cc[1]}" if cc else "of unknown compute capability"
            yield (f"FA4's block-sparse forward runs on Hopper (sm_90) and Blackwell (sm_100), this GPU is "
                   f"{have}: flashinfer and triton are the fast backends there")

    def dense_reasons(self, problem) -> List[str]:
        """Why FA4's *dense* forward (:meth:`dense`) cannot run ``problem`` (every query over
        all ``seq_len`` keys, text already among them): this backend's own reasons, the
        same text (package, import, device, dtype, head dim, GPU architecture)."""
        return self.not_supported_reasons(replace(problem, T=1, P=problem.seq_len, text_len=0, q_rows=None))

    def dense(self, q, k, v, text_k=None, text_v=None, scale=None):
        """FlashAttention-4's dense forward: every query of ``q`` ``[B, Sq, H, D]`` over every
        key of ``k``/``v`` ``[B, Sk, Hkv, D]`` (+ ``text_k``/``text_v`` appended; GQA), no
        mask and no block sparsity; ``scale`` default ``1/sqrt(D)``. The same function as
        :func:`lvsa.ops.dense_attention`: the dense baseline ``lvsa bench`` compares with
        (``--dense fa4``; the best dense of ``bench model`` when it is the fastest)."""
        k, v = append_text(k, v, text_k, text_v)
        scale = default_scale(q.shape[-1]) if scale is None else float(scale)
        with device_guard(q.device):
            res = dense_func()(q, k, v, softmax_scale=scale)
        return res[0] if isinstance(res, tuple) else res   # (out, lse): lse is None here

    def tile_for(self, problem) -> Tuple[int, int]:
        """The tables' tile: FA4's SM100 forward computes two 128-row query tiles per CTA
        (``q_stage`` 2), and its block sparsity then takes 256-row query blocks (FA4's
        interface); sm_90 runs :attr:`tile`. (Blackwell is untested.)"""
        cc = problem.compute_capability
        q_stage = 2 if problem.device_kind == "cuda" and cc is not None and cc[0] == 10 else 1
        return (self.tile[0] * q_stage, self.tile[1])

    def compile_key(self, problem) -> str:
        """What FA4 compiles anew for (its own compile key, in lvsa's terms): dtype, head
        dim, the tokens per frame and the query rows' offset in their frame (the ``div``
        mask_mod's constants), text (FA4 returns the LSE then), the exact GQA ratio, batch 1 or more (the
        tables broadcast over the batch with stride 0 only when it is > 1; FA4 keys on the
        broadcast pattern), one head or more (likewise), the GPU architecture."""
        key = f"{str(problem.dtype).replace('torch.', '')} head_dim={problem.head_dim}"
        if MASK_KIND == "div" and problem.T:   # P and the row offset are the mask_mod's constants
            P = problem.seq_len // problem.T
            key += f" P={P}"
            if problem.q_rows and problem.q_rows[0] % P:
                key += f" r={problem.q_rows[0] % P}"
        if problem.text_len:
            key += " +text"
        if problem.gqa:
            key += f" gqa{problem.num_heads // max(problem.num_kv_heads, 1)}"
        if problem.batch > 1:
            key += " batch>1"
        if problem.num_heads == 1:
            key += " heads=1"
        cc = problem.compute_capability
        if cc:
            key += f" sm_{cc[0]}{cc[1]}"
        return f"{key} fa4 {_fa4_version()}"

    def compile_cache_dir(self):
        """FA4 keeps compiled kernels in memory; on disk only with
        ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``: ``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR``,
        default ``<tmp>/<user>/flash_attention_cute_dsl_cache`` (FA4's ``cache_utils``)."""
        import getpass
        import os
        import tempfile

        if os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED") != "1":
            return None
        d = os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")
        if d:
            return d
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name (a container without one): FA4 fails the same
            return None
        return os.path.join(tempfile.gettempdir(), user, "flash_attention_cute_dsl_cache")

    def plan(self, mask: BlockMask, problem) -> FA4Plan:
        device = concrete_device(problem.device)
        P = problem.seq_len // mask.num_frames
        tables = tile_tables(mask, P, problem.q_rows, self.tile_for(problem), device=device)
        return FA4Plan(tables, problem.batch, mask.num_frames, P, problem.num_heads,
                       problem.num_kv_heads, problem.head_dim, problem.dtype, problem.q_rows)

    def run(self, handle: FA4Plan, q, k, v, text_k=None, text_v=None, scale=None):
        from .flashinfer_backend import merge_text

        check_plan("fa4", FA4Plan, handle, q, k, batch=False)   # tables broadcast over batch
        D = q.shape[-1]
        scale = default_scale(D) if scale is None else float(scale)
        has_text = text_k is not None and text_k.shape[1] > 0
        t = handle.tables
        func, bst_cls, mods = kernel()
        mod = mods(MASK_KIND, t.P, t.r)
        bst = bst_cls(t.mask_cnt, t.mask_idx, t.full_cnt, t.full_idx, block_size=t.tile)
        strided = [n for n, x in (("q", q), ("k", k), ("v", v)) if x.stride(-1) != 1]
        if strided:  # FA4 reads rows of head_dim contiguous elements
            from lvsa import telemetry
            telemetry.emit("warning", message=(
                f"fa4: {', '.join(strided)} not contiguous in head_dim, copied before every call "
                "(pass [B, S, H, D] tensors with a unit last stride to avoid the copy)"))
            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        with device_guard(q.device):
            out, lse = func(q, k, v, softmax_scale=scale, mask_mod=mod, aux_tensors=t.aux(MASK_KIND),
                            block_sparse_tensors=bst, return_lse=has_text)
        if has_text:
            # FA4's LSE is natural-log, [B, H, n]; the merge takes base 2, [B, n, H]
            out = merge_text(out, (lse / LN2).transpose(1, 2).contiguous(), q, text_k, text_v, scale)
        return out


@hookimpl
def lvsa_register_backends(register):
    register(FA4Backend())
