"""The ``flex`` plugin (plugins/lvsa-flex): FlexAttention from the BlockMask, checked
against the reference on the CPU (eager FlexAttention; CUDA compiles)."""

import pytest
import torch


import lvsa_flex  # noqa: E402
from lvsa.backend import Problem  # noqa: E402
from lvsa.backends.reference import ReferenceBackend  # noqa: E402
from lvsa.schedule import plan_schedule  # noqa: E402

REF = ReferenceBackend()


@pytest.mark.parametrize("T,P,H,Hkv,B,L", [(9, 12, 2, 1, 1, 0), (7, 33, 4, 2, 2, 20), (5, 20, 2, 2, 1, 3)])
def test_matches_reference(T, P, H, Hkv, B, L):
    mask = plan_schedule(T, W=1, n=1, reference=3).mask(1)
    g = torch.Generator().manual_seed(T * P)
    D = 32
    q, k, v = (torch.randn(B, T * P, h, D, generator=g) for h in (H, Hkv, Hkv))
    tk = tv = None
    if L:
        tk, tv = (torch.randn(B, L, Hkv, D, generator=g) for _ in range(2))
    be = lvsa_flex.FlexBackend()
    problem = Problem.from_tensors(q, k, mask, tk)
    out = be.run(be.plan(mask, problem), q, k, v, tk, tv, 0.3)
    ref = REF.run(REF.plan(mask, None), q, k, v, tk, tv, 0.3)
    assert out.shape == q.shape
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # the FlexAttention mask is built once per (mask, problem): the dispatcher caches it
    from lvsa import dispatch
    assert dispatch.plan_for(be, mask, problem) is dispatch.plan_for(be, mask, problem)


def test_mask_mod_frame_table_and_text():
    mask = plan_schedule(6, W=1, n=1, reference=2).mask(0)
    P, S = 4, 24
    table = mask.to_dense("frame")
    mm = lvsa_flex.frame_mask_mod(table, P, S)
    tok = mask.to_dense("token", tokens_per_frame=P)
    qi = torch.arange(S)[:, None].expand(S, S + 3)
    ki = torch.arange(S + 3)[None, :].expand(S, S + 3)
    got = mm(None, None, qi, ki)
    assert torch.equal(got[:, :S], tok)
    assert got[:, S:].all()  # text keys always visible


def test_capabilities_and_reasons():
    be = lvsa_flex.FlexBackend()
    assert be.name == "flex" and be.devices == ("cuda",)
    p = Problem("cpu", torch.float32, 1, 48, 2, 2, 32, T=4, P=12)
    assert any("device is cpu" in r for r in be.not_supported_reasons(p))
    cuda = Problem("cuda", torch.bfloat16, 1, 48, 2, 1, 128, text_len=5, T=4, P=12,
                   compute_capability=(9, 0))
    assert be.not_supported_reasons(cuda) == []


def test_raises_dynamo_recompile_limit():
    lvsa_flex._raise_recompile_limit()
    cfg = torch._dynamo.config
    limit = getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit")
    assert limit >= lvsa_flex.RECOMPILE_LIMIT


def test_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="lvsa")}
    assert eps.get("flex") == "lvsa_flex"
