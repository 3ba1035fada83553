"""lvsa inside a tiny offline HunyuanVideo15Pipeline: the joint video-then-text sequence,
padded text masks, dense equivalence, sparse path with rotation, foreign geometry."""
import torch

import lvsa
from lvsa import tiny

FAMILY = "hunyuan"
DENSE = dict(num_frames=17, height=32, width=32, num_inference_steps=2)    # T=5 <= 33
SPARSE = dict(num_frames=145, height=32, width=32, num_inference_steps=3)  # T=37 > 33


def test_only_the_dual_stream_attention_is_replaced(clean):
    pipe = clean
    refiner = [m.processor for m in pipe.transformer.context_embedder.modules() if hasattr(m, "processor")]
    originals = [b.attn.processor for b in pipe.transformer.transformer_blocks]
    lvsa.enable(pipe)
    assert all(type(b.attn.processor).__name__ == "HunyuanVideo15LVSAProcessor"
               for b in pipe.transformer.transformer_blocks)
    assert [m.processor for m in pipe.transformer.context_embedder.modules() if hasattr(m, "processor")] == refiner
    lvsa.disable(pipe)
    assert [b.attn.processor for b in pipe.transformer.transformer_blocks] == originals


def test_dense_equivalence_with_padded_prompts_of_different_lengths(clean):
    # two prompts in one batch: different valid text lengths, one lvsa call per sample
    prompts = ["a cat", 'a very long prompt about a red fox running through the "SNOW" at dawn']
    base, out, rec, s = tiny.compare_with_lvsa(clean, FAMILY, prompt=prompts, **DENSE)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert rec.of("engaged")[0]["dense"] and not rec.of("fallback")
    assert s["reference"] == 33
    # layers x steps x (conditional pass: one call per sample, the prompts differ in length;
    #                   unconditional pass: both negative prompts alike, one call)
    assert s["dense_calls"] == 2 * 2 * (2 + 1)


def test_sparse_engages_and_rotates(clean, capsys):
    dense, out, rec, s = tiny.compare_with_lvsa(clean, FAMILY, {"mask_log": "1"}, **SPARSE)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    (sched,) = rec.of("schedule")
    assert sched["T"] == 37 and sched["P"] == 4 and sched["kfi"] >= 2
    assert [(m["step"], m["offset"]) for m in rec.of("mask")] == [(i, i % sched["kfi"]) for i in range(3)]
    assert s["sparse_calls"] == 2 * 3 * 2 and s["dense_calls"] == 0 and s["fallbacks"] == 0
    assert "[LVSA] engaged (hunyuan): T_lat=37 P=4" in capsys.readouterr().err


def test_foreign_geometry_falls_back(clean, capsys):
    base, out, rec, _ = tiny.compare_with_lvsa(clean, FAMILY, {"patches_per_frame": 7}, **DENSE)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert {(f["origin"], f["reason"]) for f in rec.of("fallback")} == {("forward_cpu", "geometry_detect")}
    assert "reason=geometry_detect" in capsys.readouterr().err
