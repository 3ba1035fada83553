"""The ``flashinfer`` backend: FlashInfer's block-sparse wrapper, one block per latent frame.

Layout
------
FlashInfer's ``BlockSparseAttentionWrapper`` runs a block-sparse matrix of ``R x C``
blocks over ``q [M, H, D]`` and ``k, v [N, Hkv, D]``. lvsa uses ``R = C = P`` (one block
per latent frame) and folds the batch into the rows: with ``q``/``k``/``v`` viewed as
``[B*S, H(kv), D]`` (a view, no copy, for contiguous inputs), block row ``b*T + f``
attends to block columns ``b*T + c`` for ``c`` in ``attended(f)`` -- a block-diagonal
CSR over batch x frames (:func:`batched_csr`). So a CFG batch is one kernel call and the
column indices point straight into the caller's K/V: nothing is gathered or compacted.

Text tokens are merged exactly: the sparse call returns its log-sum-exp, which
FlashInfer gives in **base 2** (``lse2 = ln-LSE / ln 2``); the text keys then continue
that softmax in place (:func:`lvsa_cuda.triton_backend.attend_text_into`), so the
result is the softmax over ``attended video keys ∪ text keys`` with no phantom
(zero-padded) keys and no temporary the size of the output.

Plans and memory
----------------
``plan()`` runs FlashInfer's planner once per distinct (mask, problem); the dispatcher
caches the plan. All plans on a device share ONE float
workspace (:func:`workspace`, ``LVSA_FLASHINFER_WORKSPACE_MB``, default 128); each plan
keeps only FlashInfer's small integer schedule buffers. Its first use JIT-compiles the
kernel (about 1.5 minutes on an H200; cached under ``FLASHINFER_WORKSPACE_BASE``).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from lvsa_cuda import CudaBackend, check_plan, concrete_device, device_guard, dist_version, import_error
from lvsa.config import Setting, p_int
from lvsa.hookspecs import hookimpl
from lvsa.mask import BlockMask
from lvsa.ops import attention_lse, default_scale, merge_lse

LN2 = math.log(2.0)
DEFAULT_WORKSPACE_MB = 128

_lock = threading.Lock()
_workspaces = {}

#: ``LVSA_FLASHINFER_WORKSPACE_MB``: declared on the backend (``lvsa info --vars`` lists it)
WORKSPACE_SETTING = Setting(
    "LVSA_FLASHINFER_WORKSPACE_MB", p_int(1), DEFAULT_WORKSPACE_MB,
    "MiB of the one float workspace per device shared by every flashinfer plan",
    owner="lvsa-cuda: flashinfer")


def workspace(device: torch.device) -> torch.Tensor:
    """The one float workspace of ``device`` (uint8), shared by every plan and layer."""
    device = concrete_device(device)
    key = str(device)
    with _lock:
        buf = _workspaces.get(key)
        if buf is None:
            mb = WORKSPACE_SETTING.read()
            buf = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
            _workspaces[key] = buf
        return buf


def batched_csr(mask: BlockMask, batch: int, frames: Optional[Tuple[int, int]] = None
                ) -> Tuple[List[int], List[int]]:
    """Block-diagonal CSR over ``batch x T`` block rows.

    Row ``b*T + f`` holds the columns ``b*T + c`` for ``c`` in ``mask.attended(f)``,
    so with q/k/v viewed as ``[B*S, heads, D]`` and one block per frame every batch
    element reads only its own K/V. ``frames=(f0, f1)`` keeps only the block rows of
    query frames ``f0..f1-1`` (row ``b*(f1-f0) + f - f0``; sequence parallelism); the
    columns still index all ``T`` frames.

    Returns
    -------
    (indptr, indices) : lists of int
        ``indptr`` has ``batch*nf + 1`` entries (``nf = f1 - f0``, default ``T``).
    """
    T = mask.num_frames
    f0, f1 = frames or (0, T)
    base_ptr, base_idx = mask.indptr, mask.indices
    indptr = [0]
    indices: List[int] = []
    for b in range(batch):
        for f in range(f0, f1):
            indices.extend(c + b * T for c in base_idx[base_ptr[f]:base_ptr[f + 1]])
            indptr.append(len(indices))
    return indptr, indices


def lse2_to_natural(lse2: torch.Tensor) -> torch.Tensor:
    """FlashInfer's base-2 log-sum-exp → natural log (what :func:`lvsa.ops.merge_lse`
    and torch's SDPA use)."""
    return lse2 * LN2


def natural_to_lse2(lse: torch.Tensor) -> torch.Tensor:
    return lse / LN2


def _import_error() -> Optional[str]:
    return import_error("flashinfer")


def _flashinfer_version() -> str:
    return dist_version("flashinfer-python", "flashinfer")


@dataclass
class FlashInferPlan:
    """A planned ``BlockSparseAttentionWrapper`` for one (mask, shape)."""

    wrapper: object
    batch: int
    num_frames: int
    tokens_per_frame: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: Optional[float]
    indptr: torch.Tensor
    indices: torch.Tensor
    #: query rows ``[lo, hi)`` that ``q`` holds (sequence parallelism); ``None`` = all rows
    q_rows: Optional[Tuple[int, int]] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class FlashInferBackend(CudaBackend):
    """FlashInfer block-sparse attention, R = C = P, batch folded into the CSR."""

    name = "flashinfer"
    requires = ("flashinfer", "triton")
    install_hint = "pip install lvsa-cuda[flashinfer]"
    #: first on CUDA: 7-13 % faster than triton at every T >= 41 and 1.01-1.44x the
    #: reference at every sparse shape (H200, benchmarks/results/attention-h200-*.md)
    priority = {"cuda": 110}
    settings = (WORKSPACE_SETTING,)
    supports_q_rows = True
    description = ("FlashInfer BlockSparseAttentionWrapper, one block per latent frame, "
                   "batch as a block-diagonal CSR, text merged by base-2 LSE; "
                   "pip install lvsa-cuda[flashinfer]")

    def availability_reasons(self):
        missing = self.missing_packages()
        r = [f"package {m!r} is not installed (pip install "
             f"{'lvsa-cuda[flashinfer]' if m == 'flashinfer' else m})" for m in missing]
        if "flashinfer" not in missing:
            err = _import_error()
            if err:
                r.append(f"flashinfer is installed but fails to import ({err})")
        return r

    #: its first use per dtype/head dim JIT-builds the kernel (77-97 s on an H200)
    compiles = True

    def compile_key(self, problem) -> str:
        return f"{super().compile_key(problem)} flashinfer {_flashinfer_version()}"

    def compile_cache_dir(self):
        """FlashInfer's JIT cache: ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer``
        (the base defaults to the home directory)."""
        import os

        return os.path.join(os.environ.get("FLASHINFER_WORKSPACE_BASE") or os.path.expanduser("~"),
                            ".cache", "flashinfer")

    def extra_reasons(self, problem):
        if problem.T and problem.seq_len % problem.T:
            yield f"sequence length {problem.seq_len} is not a multiple of T={problem.T}"

    # ------------------------------------------------------------------ plan
    def plan(self, mask: BlockMask, problem) -> FlashInferPlan:
        device = concrete_device(problem.device)
        P = problem.seq_len // mask.num_frames
        return self._build(mask, problem, device, P, default_scale(problem.head_dim))

    def _build(self, mask, problem, device, P, scale) -> FlashInferPlan:
        import flashinfer

        B, T = problem.batch, mask.num_frames
        rows = problem.q_rows
        ptr, idx = batched_csr(mask, B, None if rows is None else _frames(rows, P))
        indptr = torch.tensor(ptr, dtype=torch.int32, device=device)
        indices = torch.tensor(idx, dtype=torch.int32, device=device)
        wrapper = flashinfer.BlockSparseAttentionWrapper(workspace(device))
        plan = FlashInferPlan(wrapper, B, T, P, problem.num_heads, problem.num_kv_heads,
                              problem.head_dim, problem.dtype, scale, indptr, indices, rows)
        self._plan_wrapper(plan, scale)
        return plan

    @staticmethod
    def _plan_wrapper(plan: FlashInferPlan, scale):
        P = plan.tokens_per_frame
        N = plan.batch * plan.num_frames * P
        M = N if plan.q_rows is None else plan.batch * P * _nframes(_frames(plan.q_rows, P))
        plan.wrapper.plan(
            plan.indptr, plan.indices, M, N, plan.tokens_per_frame, plan.tokens_per_frame,
            plan.num_heads, plan.num_kv_heads, plan.head_dim,
            sm_scale=scale, q_data_type=plan.dtype, o_data_type=plan.dtype)
        plan.scale = scale

    # ------------------------------------------------------------------- run
    def run(self, handle: FlashInferPlan, q, k, v, text_k=None, text_v=None, scale=None):
        check_plan("flashinfer", FlashInferPlan, handle, q, k, batch=True)
        B, n, H, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        scale = default_scale(D) if scale is None else float(scale)
        has_text = text_k is not None and text_k.shape[1] > 0
        strided = [n for n, t in (("q", q), ("k", k), ("v", v)) if not t.is_contiguous()]
        if strided:
            # FlashInfer takes [B*S, H, D] with K and V laid out alike (equal page strides).
            # A strided tensor can still *reshape* as a view (e.g. batch 1 of a transposed
            # [B, H, S, D] buffer) with other strides than its partner: copy explicitly.
            from lvsa import telemetry
            telemetry.emit("warning", message=(
                f"flashinfer: {', '.join(strided)} not contiguous, copied before every call "
                "(pass contiguous [B, S, H, D] tensors to avoid the copy)"))
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qq, cut = q, None
        if handle.q_rows is not None:  # rows [lo, hi): pad to whole frames, run their block rows
            P = handle.tokens_per_frame
            lo, hi = handle.q_rows
            f0, f1 = _frames(handle.q_rows, P)
            if (f0 * P, f1 * P) != (lo, hi):
                qq = q.new_zeros((B, (f1 - f0) * P, H, D))
                qq[:, lo - f0 * P:hi - f0 * P] = q
                cut = (lo - f0 * P, hi - f0 * P)
        m = qq.shape[1]
        with device_guard(q.device), handle.lock:
            if handle.scale is None or not math.isclose(handle.scale, scale, rel_tol=1e-7):
                self._plan_wrapper(handle, scale)
            res = handle.wrapper.run(qq.view(B * m, H, D), k.view(B * S, Hkv, D),
                                     v.view(B * S, Hkv, D), return_lse=has_text)
        out, lse2 = res if has_text else (res, None)
        out = out.view(B, m, H, D)
        if lse2 is not None:
            lse2 = lse2.view(B, m, H)
        if cut is not None:  # back to the rows q holds
            out = out[:, cut[0]:cut[1]]
            lse2 = None if lse2 is None else lse2[:, cut[0]:cut[1]]
        if has_text:
            out = merge_text(out, lse2, q, text_k, text_v, scale)
        return out if cut is None else out.contiguous()


def merge_text(out, lse2, q, text_k, text_v, scale: float):
    """Merge the text keys exactly into a finished sparse result from its base-2 LSE
    ``[B, n, H]`` (in place): the Triton kernel on a CUDA GPU; on any other device (the
    CPU stand-ins of FlashInfer and FA4) in torch, since the kernel needs CUDA tensors."""
    if q.device.type != "cuda":
        return merge_text_torch(out, lse2, q, text_k, text_v, scale)
    from .triton_backend import attend_text_into

    with device_guard(q.device):
        return attend_text_into(out, lse2, q, text_k, text_v, scale)


def merge_text_torch(out, lse2, q, text_k, text_v, scale: float):
    """The exact text merge of :func:`lvsa_cuda.triton_backend.attend_text_into` in torch
    (float32; chosen by the tensors' device when they are not on a CUDA GPU)."""
    o_txt, lse_txt = attention_lse(q, text_k, text_v, scale)
    merged, _ = merge_lse(out.float(), lse2_to_natural(lse2.float()), o_txt, lse_txt)
    out.copy_(merged.to(out.dtype))
    return out


def _frames(rows: Tuple[int, int], P: int) -> Tuple[int, int]:
    """Query frames ``[f0, f1)`` that token rows ``[lo, hi)`` touch."""
    return rows[0] // P, -(-rows[1] // P)


def _nframes(frames: Tuple[int, int]) -> int:
    return frames[1] - frames[0]


@hookimpl
def lvsa_register_backends(register):
    register(FlashInferBackend())
