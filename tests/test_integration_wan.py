"""lvsa inside a tiny offline WanPipeline: enable/disable, dense equivalence, sparse path,
rotation from real steps, fallback on a foreign geometry, image-to-video context, Wan 2.2's
second transformer, the reference-horizon warning."""
import copy

import pytest
import torch


import lvsa
from lvsa import integrations, tiny

FAMILY = "wan"
DENSE = dict(num_frames=17, height=32, width=32, num_inference_steps=2)    # T=5 <= 21
SPARSE = dict(num_frames=97, height=32, width=32, num_inference_steps=3)   # T=25 > 21


def _processors(p):
    return {n: m.processor for n, m in p.transformer.named_modules() if hasattr(m, "processor")}


def test_enable_disable_round_trip(clean):
    pipe = clean
    cls, before = type(pipe), _processors(pipe)
    base = tiny.run_latent(pipe, FAMILY, **DENSE)
    assert lvsa.enable(pipe) is pipe
    assert integrations.is_enabled(pipe) and isinstance(pipe, cls)
    after = _processors(pipe)
    replaced = {n for n in before if after[n] is not before[n]}
    assert replaced == {n for n in before if n.endswith("attn1")} and replaced
    assert all(type(after[n]).__name__ == "WanLVSAProcessor" for n in replaced)
    lvsa.disable(pipe)
    assert type(pipe) is cls and not integrations.is_enabled(pipe)
    assert all(_processors(pipe)[n] is before[n] for n in before)
    torch.testing.assert_close(tiny.run_latent(pipe, FAMILY, **DENSE), base, rtol=0, atol=0)


def test_dense_equivalence_at_or_below_reference(clean):
    base, out, rec, s = tiny.compare_with_lvsa(clean, FAMILY, **DENSE)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    (eng,) = rec.of("engaged")
    assert eng["dense"] and eng["T"] == 5 and eng["P"] == 4
    assert not rec.of("fallback")
    assert s["sparse_calls"] == 0 and s["dense_calls"] == 2 * 2 * 2  # layers x steps x CFG passes
    assert s["reference"] == 21


def test_sparse_engages_and_rotates_with_real_steps(clean, capsys):
    dense, out, rec, s = tiny.compare_with_lvsa(clean, FAMILY, {"mask_log": "1"}, **SPARSE)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    (sched,) = rec.of("schedule")
    kfi = sched["kfi"]
    assert sched["T"] == 25 and sched["reference"] == 21 and kfi >= 2
    masks = rec.of("mask")
    assert [m["step"] for m in masks] == [0, 1, 2]  # one per denoising step, CFG passes included
    assert [m["offset"] for m in masks] == [s % kfi for s in range(3)]
    assert s["sparse_calls"] == 2 * 3 * 2 and s["dense_calls"] == 0 and s["fallbacks"] == 0
    assert s["extension_ratio"] == pytest.approx(25 / 21)
    err = capsys.readouterr().err
    assert "[LVSA] engaged (wan): T_lat=25 P=4" in err and "-> SPARSE" in err
    assert err.count("[LVSA] engaged") == 1


def test_foreign_geometry_falls_back_dense_and_loud(clean, capsys):
    # an explicit P that is not this grid's
    base, out, rec, _ = tiny.compare_with_lvsa(clean, FAMILY, {"patches_per_frame": 7}, **SPARSE)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert {(f["origin"], f["reason"]) for f in rec.of("fallback")} == {("forward_cpu", "geometry_detect")}
    s = integrations.last_summary(clean)
    assert s["sparse_calls"] == s["dense_calls"] == 0 and s["fallbacks_by_reason"] == {"geometry_detect": 2 * 3 * 2}
    assert "[LVSA-FALLBACK] origin=forward_cpu reason=geometry_detect seq_len=100" in capsys.readouterr().err


def test_other_resolution_outside_the_call_is_a_fallback(clean):
    # geometry comes from the last pipeline call; a pass at another size (warm-up) runs dense, loudly
    pipe = clean
    lvsa.enable(pipe)
    tiny.run_latent(pipe, FAMILY, **DENSE)
    x = torch.randn(1, 16, 5, 8, 8)
    ctx = torch.randn(1, 8, 32)
    with tiny.EventRecorder() as rec, torch.no_grad():
        out = pipe.transformer(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=ctx).sample
    assert {f["reason"] for f in rec.of("fallback")} == {"geometry_detect"}
    lvsa.disable(pipe)
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_image_to_video_context_stays_in_cross_attention(fresh_plugins):
    # Wan 2.1 I2V: image tokens arrive through attn2's added K/V; lvsa only touches attn1
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                               out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, image_dim=4, added_kv_proj_dim=24).eval()
    x, t = torch.randn(1, 36, 9, 8, 8), torch.tensor([700])
    ctx, img = torch.randn(1, 512, 32), torch.randn(1, 3, 4)
    with torch.no_grad():
        ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img).sample
    attn2 = [b.attn2.processor for b in tr.blocks]
    lvsa.enable(tr, patches_per_frame=16, reference_latent_frames=21)
    assert [b.attn2.processor for b in tr.blocks] == attn2
    with tiny.EventRecorder() as rec, torch.no_grad():
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    s = integrations.engine_of(tr).end_generation()
    assert s["dense_calls"] == 2 and s["T"] == 9 and not rec.of("fallback")
    lvsa.disable(tr)
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in tr.blocks)


def test_wan22_second_transformer_is_covered(fresh_plugins):
    from diffusers import WanPipeline

    base = tiny.build(FAMILY)
    p = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                    transformer=base.transformer, transformer_2=copy.deepcopy(base.transformer), boundary_ratio=0.5)
    lvsa.enable(p, mask_log="1")
    assert all(type(b.attn1.processor).__name__ == "WanLVSAProcessor"
               for tr in (p.transformer, p.transformer_2) for b in tr.blocks)
    with tiny.EventRecorder() as rec:
        tiny.run_latent(p, FAMILY, **dict(SPARSE, num_inference_steps=4))
    assert [m["step"] for m in rec.of("mask")] == [0, 1, 2, 3]  # steps continue across the switch
    assert integrations.last_summary(p)["sparse_calls"] == 2 * 4 * 2
    lvsa.disable(p)


def test_reference_that_disagrees_with_the_model_is_loud(clean, capsys):
    pipe = clean
    lvsa.enable(pipe, reference_latent_frames=33)
    with tiny.EventRecorder() as rec:
        tiny.run_latent(pipe, FAMILY, **DENSE)
    msgs = [w["message"] for w in rec.of("warning")]
    assert any("33" in m and "21" in m for m in msgs)
    assert "reference_latent_frames=33" in capsys.readouterr().err


def test_bad_setting_changes_nothing(pipe):
    before = _processors(pipe)
    with pytest.raises(ValueError, match="sparsity_scale"):
        lvsa.enable(pipe, sparsity_scale=0)
    assert not integrations.is_enabled(pipe) and _processors(pipe) == before


def test_processors_replaced_after_enable_is_loud(clean, capsys):
    pipe = clean
    lvsa.enable(pipe)
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    pipe.transformer.set_attn_processor(WanAttnProcessor())  # e.g. a user's own processor swap
    with torch.no_grad():
        pipe("x", generator=torch.Generator().manual_seed(0), output_type="latent",
             **tiny.call_kwargs(FAMILY, **SPARSE))
    err = capsys.readouterr().err
    assert "[LVSA-FALLBACK] origin=pipeline reason=processors_replaced" in err
    assert integrations.last_summary(pipe)["fallbacks_by_reason"]["processors_replaced"] == 1


def test_bare_transformer_reads_geometry_from_its_input(fresh_plugins, capsys):
    tr = tiny.build(FAMILY).transformer
    integrations.enable(tr, patches_per_frame=4)   # wrong P for this input: must not run sparse wrongly
    x = torch.randn(1, 16, 25, 8, 8)                # T=25 latent frames, P=16 tokens per frame
    with torch.no_grad():
        tr(x, timestep=torch.tensor([1]), encoder_hidden_states=torch.randn(1, 8, 32))
    err = capsys.readouterr().err
    assert "reason=geometry_detect" in err and "expected_T=25" in err
    assert "-> SPARSE" not in err


def test_step_comes_from_the_step_callback_and_the_users_callback_still_runs(clean):
    from diffusers.callbacks import PipelineCallback

    pipe = clean
    lvsa.enable(pipe, mask_log="1")
    rec = tiny.EventRecorder()
    from lvsa import plugins
    plugins.register_plugin(rec)
    seen = []

    class UserCallback(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append((step_index, tuple(callback_kwargs)))
            assert "step" not in vars(pipeline.scheduler)  # no scheduler wrapper when a callback exists
            return callback_kwargs

    with torch.no_grad():
        pipe("x", generator=torch.Generator().manual_seed(0), output_type="latent",
             callback_on_step_end=UserCallback(), **tiny.call_kwargs(FAMILY, **SPARSE))
    assert seen == [(0, ("latents",)), (1, ("latents",)), (2, ("latents",))]  # the user's callback, intact
    masks = rec.of("mask")
    kfi = rec.of("schedule")[0]["kfi"]
    assert [m["step"] for m in masks] == [0, 1, 2] and [m["offset"] for m in masks] == [0, 1 % kfi, 2 % kfi]
