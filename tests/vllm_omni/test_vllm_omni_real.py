"""lvsa-vllm-omni against the real vllm-omni 0.30 (CPU; see conftest.py for the stubs).

Registration through vllm-omni's plugin loader, platform validation of the LVSA
backend, vllm-omni's own ``Attention`` layer calling it, and tiny real
``WanTransformer3DModel`` / ``HunyuanVideo15Transformer3DModel`` forwards from
vllm-omni's model code receiving the right geometry and step.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

import lvsa
import lvsa_vllm_omni
from lvsa_vllm_omni import compat, runtime
from lvsa_vllm_omni.backend import LVSAAttentionImpl, LVSABackend
from vllm_omni.diffusion.attention.backends.abstract import AttentionBackend, AttentionMetadata, VideoTokenLayout
from vllm_omni.diffusion.attention.backends.registry import DiffusionAttentionBackendEnum
from vllm_omni.diffusion.config import set_current_diffusion_config
from vllm_omni.diffusion.data import AttentionConfig, OmniDiffusionConfig
from vllm_omni.diffusion.forward_context import set_forward_context, set_forward_context_denoise_step_idx

from vllm_omni.platforms import current_omni_platform

CpuCudaOmniPlatform = type(current_omni_platform)  # conftest.py's stub of the CUDA platform

LVSA_SELF = {"per_role": {"self": {"backend": "LVSA"}}}


def od_config(attention=LVSA_SELF, model_class_name="WanPipeline", **kw):
    return OmniDiffusionConfig(model_class_name=model_class_name, diffusion_attention_config=attention, **kw)


@pytest.fixture(scope="session")
def distributed():
    """vllm-omni's parallel groups for one CPU process (gloo), as a one-GPU worker has."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm_omni.diffusion.distributed import parallel_state as ps

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    vc = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc), set_forward_context(vllm_config=vc, omni_diffusion_config=od_config()):
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        ps.initialize_model_parallel(backend="gloo")
    yield vc
    ps.destroy_model_parallel()


@contextmanager
def request(vc, cfg, step=None):
    """What the diffusion model runner does around a request: a forward context."""
    with set_forward_context(vllm_config=vc, omni_diffusion_config=cfg):
        if step is not None:
            set_forward_context_denoise_step_idx(step)
        yield


@pytest.fixture
def spy(monkeypatch):
    """Record what every ModelRuntime.observe receives (grid, step) and still run it."""
    seen = []
    original = runtime.ModelRuntime.observe

    def observe(self, span, step):
        seen.append((span.grid, step))
        return original(self, span, step)

    monkeypatch.setattr(runtime.ModelRuntime, "observe", observe)
    return seen


# ------------------------------------------------------------ registration
def test_entry_point_registers_lvsa_once():
    from vllm_omni.plugins import OMNI_DEFAULT_PLUGINS_GROUP, load_omni_plugins_by_group

    plugins = load_omni_plugins_by_group(OMNI_DEFAULT_PLUGINS_GROUP)
    assert "lvsa" in plugins
    assert plugins["lvsa"]() is True and plugins["lvsa"]() is True  # idempotent
    compat.add_backend_member()
    compat.route_ring_to_dense()
    compat.register_pipelines()
    assert list(DiffusionAttentionBackendEnum.__members__).count("LVSA") == 1
    assert DiffusionAttentionBackendEnum["LVSA"].get_class() is LVSABackend
    assert DiffusionAttentionBackendEnum["lvsa".upper()].get_path() == compat.BACKEND_CLASS_PATH
    from vllm_omni.diffusion.attention.parallel.ring import RingParallelAttention

    assert not getattr(RingParallelAttention.run_attention.__wrapped__, "_lvsa_ring", False)  # wrapped once


def test_backend_implements_the_whole_api():
    assert issubclass(LVSABackend, AttentionBackend)
    assert not LVSABackend.__abstractmethods__ and not LVSAAttentionImpl.__abstractmethods__
    assert LVSABackend.get_name() == "LVSA" and LVSABackend.get_impl_cls() is LVSAAttentionImpl
    assert LVSABackend.get_metadata_cls() is AttentionMetadata
    assert LVSABackend.supports_attention_mask() and LVSABackend.supports_head_size(128)
    assert LVSABackend.supported_platforms == ("cuda", "rocm", "npu")


def test_hunyuan_pipelines_replaced_through_register_diffusion_model():
    from vllm_omni.diffusion.models.hunyuan_video.pipeline_hunyuan_video_1_5 import HunyuanVideo15Pipeline
    from vllm_omni.diffusion.registry import DiffusionModelRegistry, get_diffusion_post_process_func

    from lvsa_vllm_omni.hunyuan import LVSAHunyuanVideo15Pipeline

    cls = DiffusionModelRegistry._try_load_model_cls("HunyuanVideo15Pipeline")
    assert cls is LVSAHunyuanVideo15Pipeline and issubclass(cls, HunyuanVideo15Pipeline)
    post = get_diffusion_post_process_func(od_config(model_class_name="HunyuanVideo15Pipeline"))
    assert callable(post)


# -------------------------------------------------------- platform validation
def test_platform_resolves_and_validates_lvsa():
    assert CpuCudaOmniPlatform.get_diffusion_attn_backend_cls("LVSA", 128) == compat.BACKEND_CLASS_PATH
    assert CpuCudaOmniPlatform.get_diffusion_attn_backend_cls("lvsa", 64) == compat.BACKEND_CLASS_PATH
    from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum

    class XpuPlatform(OmniPlatform):
        _omni_enum = OmniPlatformEnum.XPU

    with pytest.raises(ValueError, match="LVSA diffusion attention backend runs on cuda, rocm, npu only"):
        XpuPlatform.validate_diffusion_attn_backend("LVSA")


def test_per_role_config_selects_lvsa_for_self_only():
    from vllm_omni.diffusion.attention.selector import get_attn_backend_for_role

    cfg = AttentionConfig(**LVSA_SELF)
    cls, spec = get_attn_backend_for_role("self", 128, cfg)
    assert cls is LVSABackend and spec.backend == "LVSA" and spec.backend_kwargs() is None
    cross, spec = get_attn_backend_for_role("cross", 128, cfg)
    assert cross is not LVSABackend and spec is None
    with pytest.raises(ValueError, match="Unknown diffusion attention backend: 'NOPE'"):
        DiffusionAttentionBackendEnum["NOPE"]


# ------------------------------------------------- vllm-omni's Attention layer
def _layer(cfg, heads=2, head_size=16):
    from vllm_omni.diffusion.attention.layer import Attention

    with set_current_diffusion_config(cfg):
        return Attention(num_heads=heads, head_size=head_size, causal=False, softmax_scale=head_size ** -0.5,
                         role="self", qkv_layout="BSND", prefix="blocks.0.attn1")


def test_attention_layer_calls_the_backend(distributed, monkeypatch, capsys):
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    cfg = od_config()
    layer = _layer(cfg)
    assert isinstance(layer.attention, LVSAAttentionImpl) and layer.attn_backend is LVSABackend
    T, h, w = 12, 2, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T * h * w, 2, 16, generator=g) for _ in range(3))
    meta = AttentionMetadata(video_layout=VideoTokenLayout(prefix_len=0, latent_grid=(T, h, w)))
    with request(distributed, cfg, step=3):
        out = layer(q, k, v, meta)
    sched = lvsa.plan_schedule(T, 3, 1, 4, tokens_per_frame=h * w)
    torch.testing.assert_close(out, lvsa.attention(q, k, v, sched.mask_for_step(3), scale=0.25),
                               rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "[LVSA] engaged (wan): T_lat=12 P=4 seq_len=48" in err and "-> SPARSE" in err
    with request(distributed, cfg, step=0):  # no layout: dense, said once
        out = layer(q, k, v, AttentionMetadata())
    assert "[LVSA-FALLBACK] origin=forward_cuda reason=no_geometry seq_len=48" in capsys.readouterr().err


def test_attention_layer_dense_below_reference_equals_sdpa(distributed):
    cfg = od_config()
    lvsa_layer = _layer(cfg)
    sdpa_layer = _layer(od_config(attention={"per_role": {"self": {"backend": "TORCH_SDPA"}}}))
    T, h, w = 5, 2, 3
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, T * h * w + 6, 2, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, T * h * w + 6, dtype=torch.bool)
    mask[0, -4:] = False
    layout = VideoTokenLayout(prefix_len=0, latent_grid=(T, h, w))
    with request(distributed, cfg, step=0):
        a = lvsa_layer(q, k, v, AttentionMetadata(attn_mask=mask, video_layout=layout))
        b = sdpa_layer(q, k, v, AttentionMetadata(attn_mask=mask))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- Wan transformer
def _init_weights(model, seed):
    """vllm's parallel layers allocate with torch.empty (weights come from checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@contextmanager
def building(vc, cfg):
    """What the model loader does around model construction."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc), set_current_diffusion_config(cfg):
        yield


def _wan(vc, cfg, seed=0):
    from vllm_omni.diffusion.models.wan2_2.wan2_2_transformer import WanTransformer3DModel

    torch.manual_seed(seed)
    with building(vc, cfg):
        return _init_weights(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                     num_layers=2, rope_max_seq_len=64), seed)


def test_wan_transformer_forward_gets_geometry_and_step(distributed, spy, capsys):
    cfg = od_config()
    model = _wan(distributed, cfg)
    dense = _wan(distributed, od_config(attention={"per_role": {"self": {"backend": "TORCH_SDPA"}}}))
    dense.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, 7, 16, generator=g)
    long_x = torch.randn(1, 4, 25, 4, 6, generator=g)  # T=25 latent frames > 21: sparse
    short_x = torch.randn(1, 4, 9, 4, 6, generator=g)  # T=9 <= 21: dense by schedule
    with torch.no_grad():
        with request(distributed, cfg):
            outs = []
            for step in (0, 1):
                set_forward_context_denoise_step_idx(step)
                outs.append(model(long_x, torch.tensor([900 - 400 * step]), text, return_dict=False)[0])
            ref = dense(long_x, torch.tensor([500]), text, return_dict=False)[0]
        with request(distributed, cfg, step=0):  # the next request
            short = model(short_x, torch.tensor([900]), text, return_dict=False)[0]
            short_ref = dense(short_x, torch.tensor([900]), text, return_dict=False)[0]
    # two self-attention layers per call; cross-attention (role "cross") never reaches lvsa
    assert spy == [((25, 2, 3), 0)] * 2 + [((25, 2, 3), 1)] * 2 + [((9, 2, 3), 0)] * 2
    assert not torch.allclose(outs[1], ref, atol=1e-4)
    torch.testing.assert_close(short, short_ref, rtol=1e-5, atol=1e-5)
    rt = runtime.runtime_for(cfg, create=False)
    assert rt.generations == 2 and rt.family == "wan"
    err = capsys.readouterr().err
    assert "[LVSA] engaged (wan): T_lat=25 P=6 seq_len=150 kfi=2 W=3 |G|=13 -> SPARSE" in err
    assert "[LVSA] engaged (wan): T_lat=9 P=6 seq_len=54 kfi=1 W=3 |G|=9 -> DENSE (T_lat <= ref)" in err
    assert "LVSA-FALLBACK" not in err


# ------------------------------------------------------- HunyuanVideo 1.5
HV_DIMS = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
               num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
               rope_axes_dim=(4, 6, 6), task_type="t2v")


def _hunyuan_pipeline(vc, cfg, seed=0):
    """The lvsa HunyuanVideo 1.5 pipeline around a tiny real transformer (no text encoders)."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from torch import nn
    from vllm_omni.diffusion.models.hunyuan_video.hunyuan_video_15_transformer import (
        HunyuanVideo15Transformer3DModel,
    )

    from lvsa_vllm_omni.hunyuan import LVSAHunyuanVideo15Pipeline

    torch.manual_seed(seed)
    pipe = LVSAHunyuanVideo15Pipeline.__new__(LVSAHunyuanVideo15Pipeline)
    nn.Module.__init__(pipe)  # the real __init__ loads Qwen2.5-VL/ByT5 text encoders and the VAE
    with building(vc, cfg):
        pipe.transformer = _init_weights(HunyuanVideo15Transformer3DModel(od_config=cfg, **HV_DIMS), seed)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    pipe._lvsa_init(cfg)
    return pipe


def _hv_inputs(T, h, w, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 6)
    mask[:, :4] = 1  # 4 valid prompt tokens, 2 padding
    return {"hidden_states": torch.randn(1, 9, T, h, w, generator=g), "timestep": None,
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(1, 3, 8, generator=g),
            "encoder_attention_mask_2": torch.ones(1, 3), "image_embeds": torch.zeros(1, 2, 8),
            "return_dict": False}


def _predict(pipe, kwargs, i):
    t = pipe.scheduler.timesteps[i]
    pipe._current_timestep = t
    kwargs = dict(kwargs, timestep=t.expand(1))
    return pipe.predict_noise_maybe_with_cfg(do_true_cfg=False, true_cfg_scale=1.0, positive_kwargs=kwargs,
                                             negative_kwargs=None, cfg_normalize=False)


def test_hunyuan_pipeline_publishes_grid_and_step(distributed, spy, monkeypatch, capsys):
    from vllm_omni.diffusion.forward_context import get_forward_context

    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    cfg = od_config(model_class_name="HunyuanVideo15Pipeline")
    pipe = _hunyuan_pipeline(distributed, cfg)
    assert pipe._lvsa_active
    with torch.no_grad(), request(distributed, cfg):
        for i in (0, 2):
            _predict(pipe, _hv_inputs(12, 2, 3), i)
            assert get_forward_context().denoise_step_idx == i
        assert get_forward_context().total_denoise_steps == 4
    assert spy == [((12, 2, 3), 0)] * 2 + [((12, 2, 3), 2)] * 2
    err = capsys.readouterr().err
    assert "[LVSA] engaged (hunyuan): T_lat=12 P=6" in err and "-> SPARSE" in err
    assert "LVSA-FALLBACK" not in err


def test_hunyuan_dense_below_reference_equals_sdpa(distributed):
    cfg = od_config(model_class_name="HunyuanVideo15Pipeline")
    pipe = _hunyuan_pipeline(distributed, cfg)
    sdpa_cfg = od_config(attention={"per_role": {"self": {"backend": "TORCH_SDPA"}}},
                         model_class_name="HunyuanVideo15Pipeline")
    base = _hunyuan_pipeline(distributed, sdpa_cfg)
    base.transformer.load_state_dict(pipe.transformer.state_dict())
    assert not base._lvsa_active  # inert without LVSA: the parent pipeline exactly
    inputs = _hv_inputs(5, 2, 2)
    with torch.no_grad():
        with request(distributed, cfg):
            a = _predict(pipe, inputs, 1)
        with request(distributed, sdpa_cfg):
            b = _predict(base, inputs, 1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hunyuan_without_the_pipeline_says_no_geometry(distributed, capsys):
    cfg = od_config(model_class_name="HunyuanVideo15Pipeline")
    pipe = _hunyuan_pipeline(distributed, cfg)
    inputs = _hv_inputs(5, 2, 2)
    inputs["timestep"] = torch.tensor([500.0])
    with torch.no_grad(), request(distributed, cfg, step=0):
        pipe.transformer(**inputs)  # the stock pipeline publishes nothing
    assert "reason=no_geometry" in capsys.readouterr().err


def test_ring_runs_dense_with_a_line(distributed, monkeypatch, capsys):
    """Ring SP never calls a backend impl: LVSA layers take vllm-omni's SDPA ring path, loudly."""
    import vllm_omni.diffusion.attention.backends.ring_pytorch_attn as ring_sdpa
    from vllm_omni.diffusion.attention.parallel.ring import RingParallelAttention
    from vllm_omni.diffusion.distributed.parallel_state import get_sp_group

    calls = []

    def ring_sdpa_on_cpu(q, k, v, softmax_scale, **kw):  # the real one runs the CUDA "efficient" kernel
        calls.append(kw["op_type"])
        return runtime.dense_masked(q, k, v, softmax_scale)

    monkeypatch.setattr(ring_sdpa, "ring_pytorch_attn_func", ring_sdpa_on_cpu)

    cfg = od_config()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=g) for _ in range(3))
    ring = RingParallelAttention(get_sp_group(), attn_backend_pref="LVSA", attn_backend_explicit=True)
    with request(distributed, cfg, step=0):
        out = ring.run_attention(q, k, v, AttentionMetadata(), softmax_scale=0.25)
        with pytest.raises(ValueError, match="explicitly selected for ring attention"):
            RingParallelAttention.run_attention.__wrapped__(ring, q, k, v, AttentionMetadata(), softmax_scale=0.25)
    torch.testing.assert_close(out, runtime.dense_masked(q, k, v, 0.25), rtol=1e-5, atol=1e-5)
    assert calls == ["efficient"]
    assert "[LVSA-FALLBACK] origin=ring_attention reason=ring_parallel seq_len=24" in capsys.readouterr().err


def test_register_refuses_other_versions_without_crashing(capsys):
    lvsa_vllm_omni._reset_for_tests()
    try:
        assert lvsa_vllm_omni.register(version="0.22.0") is False
    finally:
        lvsa_vllm_omni._reset_for_tests()
        assert lvsa_vllm_omni.register() is True
    assert "reason=vllm_omni_version seq_len=- found=0.22.0" in capsys.readouterr().err
