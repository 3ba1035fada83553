"""lvsa-vllm-omni without vllm: the attention implementation, step/generation tracking,
the version gate, idempotent registration and the serve wrapper.

The implementation (``LVSAImplCore``, the code ``LVSAAttentionImpl`` runs) gets
stand-in metadata shaped like vllm-omni 0.30's ``AttentionMetadata``/``VideoTokenLayout``
and a stand-in forward context; the tests against the real vllm-omni live in
``tests/vllm_omni`` and run in their own environment (``ci/vllm_omni_env.sh``).
"""
import sys
from types import SimpleNamespace

import pytest
import torch

import lvsa
import lvsa_vllm_omni
from lvsa_vllm_omni import runtime, serve
from lvsa_vllm_omni.runtime import ForwardInfo, LVSAImplCore, dense_masked

H, D = 2, 16


class FakeContext:
    """Stands in for vllm-omni's ``ForwardContext`` (a dataclass: weak-referenceable)."""

    def __init__(self, step=None):
        self.step = step
SCALE = D ** -0.5


@pytest.fixture(autouse=True)
def clean(monkeypatch, fresh_plugins):
    for k in list(__import__("os").environ):
        if k.startswith("LVSA_") and k != "LVSA_CHECK":
            monkeypatch.delenv(k)
    runtime.RUNTIMES.clear()
    ctx = FakeContext()
    monkeypatch.setattr(runtime, "read_forward_context", lambda: ForwardInfo(ctx, None, ctx.step))
    yield ctx
    runtime.RUNTIMES.clear()


def layout(grid, prefix=0):
    t, h, w = grid
    return SimpleNamespace(prefix_len=prefix, latent_grid=grid, used_len=prefix + t * h * w, video_spans=())


def meta(video_layout=None, attn_mask=None):
    return SimpleNamespace(attn_mask=attn_mask, video_layout=video_layout, full_attn_spans=None,
                           query_ranges=None, packed_padding=None)


def qkv(S, B=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g, dtype=dtype) for _ in range(3)]


def impl(**kw):
    return LVSAImplCore(num_heads=H, head_size=D, softmax_scale=SCALE, **kw)


def expected_mask(T, P, step, reference):
    cfg = lvsa.Config.load()
    sched = lvsa.plan_schedule(T, cfg.latent_window(), cfg.latent_first_frames(), reference,
                               cfg.sparsity_scale, tokens_per_frame=P)
    return sched.mask_for_step(step)


# ------------------------------------------------------------------ Wan-like
def test_sparse_past_reference_equals_lvsa_attention(clean, monkeypatch, capsys):
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    T, h, w = 12, 2, 3
    q, k, v = qkv(T * h * w)
    im = impl()
    for step in (0, 1, 2):
        clean.step = step
        out = im.run(q, k, v, meta(layout((T, h, w))))
        mask = expected_mask(T, h * w, step, 4)
        assert not mask.is_dense
        ref = lvsa.attention(q, k, v, mask, scale=SCALE)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, dense_masked(q, k, v, SCALE), atol=1e-3)
    # rotation follows the published step: step 1 and 2 use different globals
    assert expected_mask(T, h * w, 1, 4).globals != expected_mask(T, h * w, 2, 4).globals
    err = capsys.readouterr().err
    assert err.count("[LVSA] engaged (generic)") == 1 and "-> SPARSE" in err


def test_dense_at_or_below_reference_equals_dense(clean, capsys):
    T, h, w = 5, 2, 2  # reference 21 (Wan default): dense by schedule
    q, k, v = qkv(T * h * w, B=2)
    clean.step = 3
    out = impl().run(q, k, v, meta(layout((T, h, w))))
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE), rtol=1e-6, atol=1e-6)
    assert "-> DENSE (T_lat <= ref)" in capsys.readouterr().err


def test_sequence_parallel_padding_tail_is_exact(clean, monkeypatch):
    """Ulysses auto-pad: [video | pad]; masked pad keys are ignored, unmasked ones attended."""
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    T, h, w, pad = 10, 1, 3, 2
    n = T * h * w
    q, k, v = qkv(n + pad)
    clean.step = 1
    mask = torch.ones(1, n + pad, dtype=torch.bool)
    mask[:, n:] = False
    sparse = expected_mask(T, h * w, 1, 4)
    im = impl()
    out = im.run(q, k, v, meta(layout((T, h, w)), attn_mask=mask))
    torch.testing.assert_close(out[:, :n], lvsa.attention(q[:, :n], k[:, :n], v[:, :n], sparse, scale=SCALE),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, n:], dense_masked(q[:, n:], k, v, SCALE, mask), rtol=1e-5, atol=1e-5)
    out2 = im.run(q, k, v, meta(layout((T, h, w))))  # mask_sp_padding=False: pad keys are attended
    torch.testing.assert_close(out2[:, :n], lvsa.attention(q[:, :n], k[:, :n], v[:, :n], sparse, scale=SCALE,
                                                            text_k=k[:, n:], text_v=v[:, n:]),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ HunyuanVideo-like
def test_joint_text_with_key_mask(clean, monkeypatch, capsys):
    """[video | text] with a 2D key mask: video queries attend to the valid text keys only,
    text queries run dense with the mask, as vllm-omni's SDPA backend does."""
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    T, h, w, L = 9, 2, 2, 5
    n = T * h * w
    q, k, v = qkv(n + L, B=2, seed=3)
    mask = torch.ones(2, n + L, dtype=torch.bool)
    mask[0, n + 3:] = False  # prompts of different lengths
    mask[1, n + 1:] = False
    rt = runtime.runtime_for(None)
    rt.publish(clean, (T, h, w))
    clean.step = 2
    out = impl().run(q, k, v, meta(attn_mask=mask))
    sparse = expected_mask(T, h * w, 2, 4)
    for b, valid in ((0, 3), (1, 1)):
        ref_v = lvsa.attention(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], sparse, scale=SCALE,
                               text_k=k[b:b + 1, n:n + valid], text_v=v[b:b + 1, n:n + valid])
        torch.testing.assert_close(out[b:b + 1, :n], ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, n:], dense_masked(q[:, n:], k, v, SCALE, mask), rtol=1e-5, atol=1e-5)
    assert "reason=" not in capsys.readouterr().err


def test_key_index_is_built_once_for_every_layer_and_step(clean, monkeypatch):
    """The non-video row index of a [video | text] sequence belongs to the model's geometry,
    not to a layer or a step: built once, then shared; a new text length builds its own."""
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    built = []
    real = runtime.non_video_rows
    monkeypatch.setattr(runtime, "non_video_rows", lambda *a: built.append(a[:3]) or real(*a))
    T, h, w, L = 9, 2, 2, 5
    n = T * h * w
    layers = [impl(prefix=f"blocks.{i}.attn1") for i in range(6)]
    runtime.runtime_for(None).publish(clean, (T, h, w))
    q, k, v = qkv(n + L, B=2, seed=7)
    mask = torch.ones(2, n + L, dtype=torch.bool)
    mask[1, n + 2:] = False  # ragged prompts: the per-sample path
    outs = []
    for step in (0, 1, 2):
        clean.step = step
        outs.append([im.run(q, k, v, meta(attn_mask=mask)) for im in layers])
    assert built == [(0, n, n + L)]
    # what every layer computed is what the index says: sparse video rows, masked dense text rows
    sparse = expected_mask(T, h * w, 2, 4)
    ref = lvsa.attention(q[1:, :n], k[1:, :n], v[1:, :n], sparse, scale=SCALE, text_k=k[1:, n:n + 2],
                         text_v=v[1:, n:n + 2])
    for out in outs[2]:
        torch.testing.assert_close(out[1:, :n], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, n:], dense_masked(q[:, n:], k, v, SCALE, mask), rtol=1e-5, atol=1e-5)
    q, k, v = qkv(n + L + 3, B=2, seed=8)  # a longer prompt
    for im in layers:
        im.run(q, k, v, meta(attn_mask=None))
    assert built == [(0, n, n + L), (0, n, n + L + 3)]


def test_a_row_index_cached_under_inference_mode_serves_autograd(clean, monkeypatch):
    """The row index built by a call under torch.inference_mode() (how serving runs) is a
    normal tensor: a later call with autograd on the same geometry (a no-vllm caller fine-tuning
    through LVSAImplCore) indexes K/V with it and back-propagates, instead of failing with
    "Inference tensors cannot be saved for backward"."""
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    T, h, w, L = 12, 2, 3, 5
    n = T * h * w
    assert not expected_mask(T, h * w, 1, 4).is_dense
    runtime.runtime_for(None).publish(clean, (T, h, w))
    clean.step = 1
    im = impl()
    q, k, v = qkv(n + L, seed=9)
    mask = torch.ones(1, n + L, dtype=torch.bool)
    mask[:, n + 3:] = False
    with torch.inference_mode():
        want = im.run(q, k, v, meta(attn_mask=mask))
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    got = im.run(q, k, v, meta(attn_mask=mask))
    got.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert bool(k.grad[:, n:n + 3].abs().sum() > 0) and not k.grad[:, n + 3:].any()  # text keys: valid ones only
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    assert [idx.is_inference() for idx in im.runtime._other_rows.values()] == [False]


def test_joint_text_dense_below_reference_equals_masked_dense(clean):
    T, h, w, L = 3, 2, 2, 4  # hunyuan-like sizes, reference 21: dense by schedule
    n = T * h * w
    q, k, v = qkv(n + L, B=1, seed=5)
    mask = torch.ones(1, n + L, dtype=torch.bool)
    mask[:, n + 2:] = False
    runtime.runtime_for(None).publish(clean, (T, h, w))
    clean.step = 0
    out = impl().run(q, k, v, meta(attn_mask=mask))
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE, mask), rtol=1e-5, atol=1e-5)


def test_published_grid_belongs_to_its_forward_context(clean, monkeypatch, capsys):
    T, h, w = 3, 2, 2
    q, k, v = qkv(T * h * w)
    runtime.runtime_for(None).publish(clean, (T, h, w))
    other = FakeContext(0)  # a later request: a new forward context
    monkeypatch.setattr(runtime, "read_forward_context", lambda: ForwardInfo(other, None, 0))
    out = impl().run(q, k, v, meta())
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE))
    assert "reason=no_geometry" in capsys.readouterr().err


# ------------------------------------------------------------ fallbacks
def test_no_geometry_runs_dense_with_a_line(clean, capsys):
    q, k, v = qkv(24)
    clean.step = 0
    out = impl().run(q, k, v, meta())
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE))
    err = capsys.readouterr().err
    assert "[LVSA-FALLBACK] origin=forward_cuda reason=no_geometry seq_len=24" in err


def test_other_calls_fall_back_loudly(clean, capsys):
    q, k, v = qkv(12)
    k2, v2 = qkv(20, seed=1)[:2]
    out = impl().run(q, k2, v2, meta(layout((3, 2, 2))), origin="forward_npu")  # AllGather-KV / cross
    torch.testing.assert_close(out, dense_masked(q, k2, v2, SCALE))
    m4 = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    out = impl().run(q, k, v, meta(layout((3, 2, 2)), attn_mask=m4))
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE, m4))
    video_masked = torch.ones(1, 12, dtype=torch.bool)
    video_masked[0, 4] = False
    out = impl().run(q, k, v, meta(layout((3, 2, 2)), attn_mask=video_masked))
    torch.testing.assert_close(out, dense_masked(q, k, v, SCALE, video_masked))
    err = capsys.readouterr().err
    assert "origin=forward_npu reason=kv_length_mismatch seq_len=12 kv_len=20" in err
    assert "reason=attention_mask seq_len=12 mask_shape=1x1x12x12" in err
    assert err.count("reason=attention_mask") == 1  # one line per (origin, reason, seq_len) ...
    counts = runtime.runtime_for(None).summary()["fallbacks_by_reason"]
    assert counts == {"kv_length_mismatch": 1, "attention_mask": 2}  # ... every call counted


def test_ring_parallel_line(clean, capsys):
    runtime.ring_fallback(4096)
    assert "[LVSA-FALLBACK] origin=ring_attention reason=ring_parallel seq_len=4096" in capsys.readouterr().err


def test_backend_kwargs_and_bad_settings_are_errors(clean, monkeypatch):
    with pytest.raises(ValueError, match="LVSA_CONFIG"):
        impl(backend_kwargs={"sparsity": 0.5})
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "wide")
    with pytest.raises(ValueError, match="LVSA_WINDOW_SIZE"):
        impl(od_config=SimpleNamespace(model_class_name="WanPipeline", model=None))


# ---------------------------------------------------- step and generations
def test_step_and_generation_tracking(clean, monkeypatch, capsys):
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "4")
    im = impl()
    rt = im.runtime
    q, k, v = qkv(12 * 2)
    for step in (0, 0, 1, 2, 3):  # repeated calls within a step (CFG, layers) are one step
        clean.step = step
        im.run(q, k, v, meta(layout((12, 1, 2))))
    assert (rt.generations, rt.step, rt.engine.step) == (1, 3, 3)
    clean.step = 0  # the next request: the step goes back
    im.run(q, k, v, meta(layout((12, 1, 2))))
    assert (rt.generations, rt.engine.step) == (2, 0)
    clean.step = 1  # same step direction, new geometry
    q2, k2, v2 = qkv(16 * 2)
    im.run(q2, k2, v2, meta(layout((16, 1, 2))))
    assert (rt.generations, rt.engine.step) == (3, 1)
    err = capsys.readouterr().err
    assert err.count("[LVSA] engaged") == 3
    assert "T_lat=16 P=2" in err


def test_missing_step_is_announced_once(clean, capsys):
    q, k, v = qkv(12)
    im = impl()
    for _ in range(3):
        im.run(q, k, v, meta(layout((3, 2, 2))))
    err = capsys.readouterr().err
    assert err.count("no denoising step published") == 1


def test_one_engine_per_model():
    cfg_a = SimpleNamespace(model_class_name="HunyuanVideo15Pipeline", model=None)
    cfg_b = SimpleNamespace(model_class_name="WanPipeline", model=None)
    a1, a2, b = impl(od_config=cfg_a), impl(od_config=cfg_a), impl(od_config=cfg_b)
    assert a1.runtime is a2.runtime and a1.runtime.engine is a2.runtime.engine
    assert b.runtime is not a1.runtime
    assert (a1.runtime.family, a1.runtime.engine.reference) == ("hunyuan", 33)
    assert (b.runtime.family, b.runtime.engine.reference) == ("wan", 21)


def test_wan_ti2v_reference_from_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text('{"expand_timesteps": true}')
    assert runtime.known_reference("wan", str(tmp_path)) == 31
    assert runtime.known_reference("wan", None) == 21
    assert runtime.known_reference("hunyuan", str(tmp_path)) == 33
    assert runtime.known_reference("generic", None) is None


def test_reference_not_the_models_is_a_warning(clean, monkeypatch, capsys):
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "21")
    im = impl(od_config=SimpleNamespace(model_class_name="HunyuanVideo15Pipeline", model=None))
    q, k, v = qkv(12)
    clean.step = 0
    im.run(q, k, v, meta(layout((3, 2, 2))))
    assert ("[LVSA] WARNING reference_latent_frames=21 but this hunyuan model was trained at 33 latent frames"
            in capsys.readouterr().err)


# --------------------------------------------------- version gate, registration
@pytest.mark.parametrize("found,ok", [("0.30.0", True), ("0.30.2rc1", True), ("0.30.1.dev4+g1a2b", True),
                                      ("0.22.0", False), ("0.31.0", False), ("1.30.0", False),
                                      ("dev", False), (None, False)])
def test_version_gate(found, ok):
    assert (lvsa_vllm_omni.version_problem(found) is None) is ok


def test_unsupported_version_is_a_line_not_a_crash(capsys):
    lvsa_vllm_omni._reset_for_tests()
    try:
        assert lvsa_vllm_omni.register(version="0.22.1") is False
        assert lvsa_vllm_omni.register(version="0.22.1") is False
    finally:
        lvsa_vllm_omni._reset_for_tests()
    err = capsys.readouterr().err
    assert err.count("[LVSA-FALLBACK] origin=lvsa_vllm_omni.register reason=vllm_omni_version seq_len=- "
                     "found=0.22.1 supported=>=0.30,<0.31") == 1


def test_without_vllm_omni_register_says_so(capsys):
    lvsa_vllm_omni._reset_for_tests()
    try:
        if lvsa_vllm_omni.installed_version() is None:
            assert lvsa_vllm_omni.register() is False
            assert "reason=vllm_omni_version seq_len=- found=none" in capsys.readouterr().err
        assert "vllm_omni" not in sys.modules and "vllm" not in sys.modules
    finally:
        lvsa_vllm_omni._reset_for_tests()


def test_register_is_idempotent(monkeypatch):
    from lvsa_vllm_omni import compat

    calls = []
    for name in ("add_backend_member", "route_ring_to_dense", "register_pipelines"):
        monkeypatch.setattr(compat, name, lambda name=name: calls.append(name))
    lvsa_vllm_omni._reset_for_tests()
    try:
        assert lvsa_vllm_omni.register(version="0.30.0") is True
        assert lvsa_vllm_omni.register(version="0.30.0") is True
    finally:
        lvsa_vllm_omni._reset_for_tests()
    assert calls == ["add_backend_member", "route_ring_to_dense", "register_pipelines"]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm_omni.general_plugins")}
    assert eps.get("lvsa") == "lvsa_vllm_omni:register"


# --------------------------------------------------------------- serve
def test_serve_prints_the_command_it_runs(monkeypatch, capsys):
    monkeypatch.delenv("LVSA_CHECK", raising=False)
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "33")
    assert serve.main(["hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v", "--port", "8091", "--dry-run"]) == 0
    line = capsys.readouterr().err.strip()
    assert line == ("[LVSA] lvsa_vllm_omni.serve runs: LVSA_REFERENCE_LATENT_FRAMES=33 vllm serve "
                    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v --omni --diffusion-attention-config "
                    "'{\"per_role\":{\"self\":{\"backend\":\"LVSA\"}}}' --port 8091")


def test_serve_merges_and_refuses_conflicts():
    cmd = serve.build_command("m", ["--omni", "--diffusion-attention-config",
                                    '{"per_role":{"cross":{"backend":"TORCH_SDPA"}}}'])
    assert cmd == ["vllm", "serve", "m", "--diffusion-attention-config",
                   '{"per_role":{"cross":{"backend":"TORCH_SDPA"},"self":{"backend":"LVSA"}}}', "--omni"]
    with pytest.raises(SystemExit, match="already selects 'FLASH_ATTN'"):
        serve.build_command("m", ['--diffusion-attention-config={"per_role":{"self":"FLASH_ATTN"}}'])


def test_serve_without_vllm_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert serve.main(["m"]) == 2
    assert "`vllm` is not on PATH" in capsys.readouterr().err


def test_an_unreadable_model_index_is_said_not_guessed_silently(tmp_path):
    from lvsa import plugins

    seen = []

    class Sink:
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_event(self, event):
            seen.append(event)

    sink = Sink()
    plugins.register_plugin(sink, name="test-sink")
    try:
        (tmp_path / "model_index.json").write_text("{not json")
        assert runtime.known_reference("wan", str(tmp_path)) == 21
    finally:
        plugins.unregister_plugin(sink)
    msgs = [e.get("message", "") for e in seen if e.kind == "warning"]
    assert any("model_index.json could not be read" in m and "LVSA_REFERENCE_LATENT_FRAMES" in m for m in msgs)
