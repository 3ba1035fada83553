"""The ``reference`` backend: exact block-sparse attention with torch SDPA, any device.

For each run of consecutive query frames that attend to the same key frames, the
attended frames' K/V are gathered (one frame's context) with the text K/V
appended, and one SDPA call computes the exact softmax over that union. No S×S
mask exists at any point: memory is O(S·D) for the output plus one context.

It is the correctness oracle of every other backend and the last fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..backend import Backend
from ..hookspecs import hookimpl
from ..mask import BlockMask
from ..ops import append_text, default_scale, sdpa


def frame_groups(mask: BlockMask) -> List[Tuple[int, int, Tuple[int, ...]]]:
    """Runs ``(first, last, attended)`` of consecutive query frames with equal rows."""
    groups = []
    for f, row in enumerate(mask.attended_lists):
        if groups and groups[-1][2] == row:
            groups[-1] = (groups[-1][0], f, row)
        else:
            groups.append((f, f, row))
    return groups


@dataclass(frozen=True)
class RowsPlan:
    """Frame groups plus the query rows ``[lo, hi)`` that ``q`` holds (sequence parallelism)."""

    groups: list
    lo: int
    hi: int


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "npu", "mps", "xpu")
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    supports_q_rows = True
    #: torch ops end to end: autograd differentiates it on every device
    grad_devices = devices
    description = "torch SDPA per frame group; exact; any device (oracle and last fallback)"
    #: the last resort of automatic selection on every device
    priority = {d: 0 for d in devices}
    tolerances = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
                  torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

    def plan(self, mask, problem):
        """Frame groups with their key-frame index tensors on the problem's device."""
        device = None if problem is None else problem.device
        groups = [(a, b, row, torch.tensor(row, device=device)) for a, b, row in frame_groups(mask)]
        if problem is not None and problem.q_rows is not None:
            return RowsPlan(groups, *problem.q_rows)
        return groups

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        """Every frame group: SDPA of its query rows (those ``q`` holds: all of them, or
        ``[lo, hi)`` with a :class:`RowsPlan`) over the group's attended K/V (+ text)."""
        if isinstance(plan, RowsPlan):
            groups, lo, hi = plan.groups, plan.lo, plan.hi
        elif isinstance(plan, list):
            groups, lo, hi = plan, 0, q.shape[1]
        else:
            raise TypeError(f"reference.run() takes the plan from reference.plan(mask, problem), "
                            f"got {type(plan).__name__}")
        B, _, H, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        T = groups[-1][1] + 1
        P = S // T
        scale = default_scale(D) if scale is None else scale
        k5 = k.view(B, T, P, Hkv, D)
        v5 = v.view(B, T, P, Hkv, D)
        out = torch.empty_like(q)
        dense_row = tuple(range(T))
        for first, last, row, idx in groups:
            a, b = max(first * P, lo), min((last + 1) * P, hi)
            if a >= b:
                continue
            if row == dense_row:
                kk, vv = k, v
            else:
                idx = idx.to(q.device, non_blocking=True)
                kk = k5.index_select(1, idx).reshape(B, len(row) * P, Hkv, D)
                vv = v5.index_select(1, idx).reshape(B, len(row) * P, Hkv, D)
            kk, vv = append_text(kk, vv, text_k, text_v)
            g0, g1 = first * P, (last + 1) * P
            if (a, b) == (g0, g1):
                out[:, a - lo:b - lo] = sdpa(q[:, a - lo:b - lo], kk, vv, scale)
            else:  # a group cut by the row range: run its full extent (zero rows padded in) so
                # SDPA blocks the rows as the single-device call does -- bit-identical results
                qq = q.new_zeros((B, g1 - g0, H, D))
                qq[:, a - g0:b - g0] = q[:, a - lo:b - lo]
                out[:, a - lo:b - lo] = sdpa(qq, kk, vv, scale)[:, a - g0:b - g0]
        return out


@hookimpl
def lvsa_register_backends(register):
    register(ReferenceBackend())
