"""The ``reference`` backend: exact block-sparse attention with torch SDPA, any device.

For each run of consecutive query frames that attend to the same key frames, the
attended frames' K/V are gathered (one frame's context) with the text K/V
appended, and one SDPA call computes the exact softmax over that union. No S×S
mask exists at any point: memory is O(S·D) for the output plus one context.

It is the correctness oracle of every other backend and the last fallback.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..backend import Backend
from ..hookspecs import hookimpl
from ..mask import BlockMask
from ..ops import default_scale, sdpa


def frame_groups(mask: BlockMask) -> List[Tuple[int, int, Tuple[int, ...]]]:
    """Runs ``(first, last, attended)`` of consecutive query frames with equal rows."""
    groups = []
    for f, row in enumerate(mask.attended_lists):
        if groups and groups[-1][2] == row:
            groups[-1] = (groups[-1][0], f, row)
        else:
            groups.append((f, f, row))
    return groups


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "npu", "mps", "xpu")
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    description = "torch SDPA per frame group; exact; any device (oracle and last fallback)"
    #: the last resort of automatic selection on every device
    priority = {d: 0 for d in devices}
    tolerances = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
                  torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

    def plan(self, mask, problem):
        """Frame groups with their key-frame index tensors on the problem's device."""
        device = None if problem is None else problem.device
        return [(a, b, row, torch.tensor(row, device=device)) for a, b, row in frame_groups(mask)]

    def run(self, plan, q, k, v, text_k=None, text_v=None, scale=None):
        if not isinstance(plan, list):
            raise TypeError(f"reference.run() takes the plan from reference.plan(mask, problem), "
                            f"got {type(plan).__name__}")
        groups = plan
        B, S, H, D = q.shape
        Hkv = k.shape[2]
        T = groups[-1][1] + 1
        P = S // T
        scale = default_scale(D) if scale is None else scale
        q5 = q.view(B, T, P, H, D)
        k5 = k.view(B, T, P, Hkv, D)
        v5 = v.view(B, T, P, Hkv, D)
        out = torch.empty_like(q)
        o5 = out.view(B, T, P, H, D)
        dense_row = tuple(range(T))
        for first, last, row, idx in groups:
            if row == dense_row:
                kk, vv = k, v
            else:
                idx = idx.to(q.device, non_blocking=True)
                kk = k5.index_select(1, idx).reshape(B, len(row) * P, Hkv, D)
                vv = v5.index_select(1, idx).reshape(B, len(row) * P, Hkv, D)
            if text_k is not None:
                kk = torch.cat([kk, text_k], dim=1)
                vv = torch.cat([vv, text_v], dim=1)
            qq = q5[:, first:last + 1].reshape(B, (last - first + 1) * P, H, D)
            o5[:, first:last + 1] = sdpa(qq, kk, vv, scale).reshape(B, last - first + 1, P, H, D)
        return out


@hookimpl
def lvsa_register_backends(register):
    register(ReferenceBackend())
