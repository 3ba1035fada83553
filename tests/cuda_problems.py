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


#: the sequence-parallel cases both block-sparse CUDA backends are tested on: (query rows, text)
ROW_CASES = [((0, 24), 0), ((17, 61), 5), ((36, 84), 3)]


def query_rows_case(L: int):
    """A small GQA problem with frames cut anywhere (T 7, P 12, batch 2, ``L`` text tokens):
    ``(mask, q, k, v, text_k, text_v, reference output of all rows)``."""
    from lvsa.backends.reference import ReferenceBackend
    from lvsa.schedule import plan_schedule

    B, T, P, H, Hkv, D = 2, 7, 12, 2, 1, 16
    mask = plan_schedule(T, 1, 1, 3).mask(1)
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    q, k, v = r(B, T * P, H, D), r(B, T * P, Hkv, D), r(B, T * P, Hkv, D)
    tk, tv = (r(B, L, Hkv, D), r(B, L, Hkv, D)) if L else (None, None)
    ref = ReferenceBackend().run(ReferenceBackend().plan(mask, None), q, k, v, tk, tv)
    return mask, q, k, v, tk, tv, ref
