"""lvsa inside a tiny offline CogVideoXPipeline (RoPE, 5B style): the joint text-then-video
sequence, batched CFG, fused QKV projections, dense equivalence, sparse path, fallback."""
import pytest
import torch


import lvsa  # noqa: E402
from lvsa import integrations, tiny  # noqa: E402

FAMILY = "cogvideox"
DENSE = dict(num_frames=33, height=32, width=32, num_inference_steps=2)    # T=9 <= 13
SPARSE = dict(num_frames=65, height=32, width=32, num_inference_steps=3)   # T=17 > 13


@pytest.fixture
def pipe(fresh_plugins):
    p = tiny.build(FAMILY)
    yield p
    integrations.disable(p)


def test_round_trip_and_dense_equivalence(pipe):
    originals = [b.attn1.processor for b in pipe.transformer.transformer_blocks]
    base, out, rec, s = tiny.compare_with_lvsa(pipe, FAMILY, **DENSE)
    assert all(type(b.attn1.processor).__name__ == "CogVideoXLVSAProcessor" for b in pipe.transformer.transformer_blocks)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5)
    (eng,) = rec.of("engaged")
    assert eng["dense"] and eng["T"] == 9 and not rec.of("fallback")
    assert s["reference"] == 13
    lvsa.disable(pipe)
    assert [b.attn1.processor for b in pipe.transformer.transformer_blocks] == originals


def test_fused_qkv_projections(pipe):
    pipe.transformer.fuse_qkv_projections()
    base, out, _, _ = tiny.compare_with_lvsa(pipe, FAMILY, **DENSE)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5)


def test_sparse_with_batched_cfg_rotates_per_step(pipe, capsys):
    # CogVideoX runs conditional and unconditional in one batch: one forward per step
    dense, out, rec, s = tiny.compare_with_lvsa(pipe, FAMILY, {"mask_log": "1"}, **SPARSE)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    (sched,) = rec.of("schedule")
    assert sched["T"] == 17 and sched["kfi"] >= 2
    assert [(m["step"], m["offset"]) for m in rec.of("mask")] == [(i, i % sched["kfi"]) for i in range(3)]
    assert s["sparse_calls"] == 2 * 3 and s["fallbacks"] == 0
    assert "[LVSA] engaged (cogvideox): T_lat=17 P=4" in capsys.readouterr().err


def test_foreign_geometry_and_explicit_masks_fall_back(pipe, capsys):
    base, out, rec, _ = tiny.compare_with_lvsa(pipe, FAMILY, {"patches_per_frame": 7}, **DENSE)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-5)
    assert {(f["origin"], f["reason"]) for f in rec.of("fallback")} == {("forward_cpu", "geometry_detect")}
    assert "[LVSA-FALLBACK] origin=forward_cpu reason=geometry_detect" in capsys.readouterr().err
    # an attention mask (no CogVideoX pipeline passes one) goes to the original processor, loudly
    attn = pipe.transformer.transformer_blocks[0].attn1
    hs, enc = torch.randn(1, 8, 32), torch.randn(1, 4, 32)  # video and text tokens, width 2 heads x 16
    with tiny.EventRecorder() as rec, torch.no_grad():
        got = attn.processor(attn, hs, enc, attention_mask=torch.ones(1, 12))
        want = attn.processor.original(attn, hs, enc, attention_mask=torch.ones(1, 12))
    torch.testing.assert_close(got[0], want[0])
    assert [f["reason"] for f in rec.of("fallback")] == ["attention_mask"]
