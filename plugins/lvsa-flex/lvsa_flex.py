"""lvsa-flex: a ``flex`` backend built on PyTorch FlexAttention.

The lvsa BlockMask becomes a FlexAttention ``BlockMask`` through a ``mask_mod`` that
looks up a ``[T, T]`` frame table: query token ``q`` may see video key ``k`` when
``table[q // P, k // P]``. Text tokens are appended after the video keys (``k >= S``)
and are always visible. GQA goes through ``enable_gqa``. On CUDA, ``flex_attention``
and ``create_block_mask`` are compiled (``_compile=True``: without it the mask build
runs out of memory for long videos); the FlexAttention mask is built once per
(lvsa mask, problem) by ``plan()``; lvsa's dispatcher caches it. Each new shape
is a recompilation, so the plugin raises dynamo's recompile limit to
:data:`RECOMPILE_LIMIT` (past the default 8 dynamo would fall back to eager mode,
which materialises the whole mask and runs out of memory).

FlexAttention works on 128-token blocks, so with ``P`` not a multiple of 128 the
blocks at frame boundaries are partial and evaluated element-wise; text keys are
concatenated to the video keys (one copy of K and V per call when text is present).

Install: ``pip install -e plugins/lvsa-flex`` (entry point ``flex`` in group ``lvsa``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lvsa.backend import Backend
from lvsa.hookspecs import hookimpl
from lvsa.mask import BlockMask
from lvsa.ops import append_text, default_scale

__version__ = "0.1.0"

BLOCK_SIZE = 128


def _flex_modules():
    from torch.nn.attention import flex_attention as fa

    return fa


#: compiled variants allowed per function (one per shape); dynamo's default is 8, after
#: which it silently runs eagerly -- and an eager ``create_block_mask``/``flex_attention``
#: materialises the full S x S mask (hundreds of GiB for long videos).
RECOMPILE_LIMIT = 256


def _raise_recompile_limit():
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(cfg, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    fa = _flex_modules()
    _raise_recompile_limit()
    return torch.compile(fa.flex_attention, dynamic=False)


def frame_mask_mod(table: torch.Tensor, P: int, S: int):
    """``mask_mod(b, h, q_idx, kv_idx)``: video keys by the ``[T, T]`` frame table,
    keys at ``kv_idx >= S`` (text) always visible."""
    T = table.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        qf = q_idx // P
        kf = torch.clamp(kv_idx // P, max=T - 1)
        return (kv_idx >= S) | table[qf, kf]

    return mask_mod


@dataclass
class FlexPlan:
    block_mask: object
    S: int
    L: int


class FlexBackend(Backend):
    """FlexAttention over the lvsa frame mask (compiled on CUDA)."""

    name = "flex"
    devices = ("cuda",)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    head_dims = None
    max_head_dim = 256
    supports_gqa = True
    #: flex_attention has a backward on CUDA; on the CPU torch refuses one
    grad_devices = ("cuda",)
    supports_text = True
    min_compute_capability = (8, 0)
    requires = ("torch.nn.attention.flex_attention",)
    install_hint = "upgrade torch to >= 2.5"
    #: never chosen automatically: slower than the reference at every measured shape
    #: (H200); ``backend="flex"`` selects it
    priority: dict = {}
    #: (atol, rtol) against float64 attention (``python -m lvsa.testing flex``)
    tolerances = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2),
                  torch.float16: (2e-3, 2e-3)}
    description = "PyTorch FlexAttention with a frame-table mask_mod (torch-native, compiled on CUDA)"

    def missing_packages(self):
        try:
            _flex_modules()
        except ImportError:
            return ["torch>=2.5 (torch.nn.attention.flex_attention)"]
        return []

    def availability_reasons(self):
        return [f"{m} is not available: upgrade torch" for m in self.missing_packages()]

    def plan(self, mask: BlockMask, problem) -> FlexPlan:
        return self.plan_for(mask, problem.seq_len, problem.text_len, problem.device)

    def plan_for(self, mask: BlockMask, S: int, L: int, device) -> FlexPlan:
        """The FlexAttention block mask of ``mask`` for ``S`` video and ``L`` text tokens."""
        fa = _flex_modules()
        T = mask.num_frames
        P = S // T
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        table = mask.to_dense("frame").to(device)
        compile_ = device.type == "cuda"
        if compile_:
            _raise_recompile_limit()
        bm = fa.create_block_mask(frame_mask_mod(table, P, S), None, None, S, S + L,
                                  device=str(device), BLOCK_SIZE=BLOCK_SIZE, _compile=compile_)
        return FlexPlan(bm, S, L)

    def run(self, handle, q, k, v, text_k=None, text_v=None, scale=None):
        B, S, H, D = q.shape
        L = 0 if text_k is None else text_k.shape[1]
        if not isinstance(handle, FlexPlan):
            raise TypeError(f"flex.run() takes the FlexPlan from flex.plan(mask, problem), "
                            f"got {type(handle).__name__}")
        if (handle.S, handle.L) != (S, L):
            raise ValueError(f"flex plan was made for S={handle.S}, text={handle.L}; got S={S}, text={L}")
        k, v = append_text(k, v, text_k, text_v)
        scale = default_scale(D) if scale is None else float(scale)
        fn = _compiled_flex() if q.is_cuda else _flex_modules().flex_attention
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                 block_mask=handle.block_mask, scale=scale,
                 enable_gqa=k.shape[2] != H)
        return out.transpose(1, 2)


@hookimpl
def lvsa_register_backends(register):
    register(FlexBackend())
