"""The problem the CUDA backends' reason tests ask about: HunyuanVideo-like on an H200
(bf16, head_dim 128, 256 text tokens, P = 1560), any field overridden by keyword."""
import torch

from lvsa.backend import Problem


def h200_problem(**kw) -> Problem:
    base = dict(device_kind="cuda", dtype=torch.bfloat16, batch=2, seq_len=9 * 1560,
                num_heads=12, num_kv_heads=12, head_dim=128, text_len=256, T=9, P=1560,
                compute_capability=(9, 0))
    base.update(kw)
    return Problem(**base)
