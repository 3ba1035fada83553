"""Engine + default sink: the documented lines, dedup, silencing, per-step logs, summaries."""
import re

import pytest
import torch

from lvsa import telemetry
from lvsa.engine import Engine
from lvsa.ops import dense_attention

LINE = re.compile(r"^\[(LVSA|LVSA-[A-Z]+)\] ")


def qkv(B, S, H=2, Hkv=2, D=8, L=0):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    tk = torch.randn(B, L, Hkv, D, generator=g) if L else None
    tv = torch.randn(B, L, Hkv, D, generator=g) if L else None
    return q, k, v, tk, tv


def lvsa_lines(err):
    return [ln for ln in err.splitlines() if LINE.match(ln)]


def test_sparse_run_prints_schedule_and_engaged_once(fresh_plugins, capsys):
    eng = Engine(family="hunyuan", reference=None, window_size=4, n_first_frames=4)
    eng.set_geometry(patches_per_frame=6, reference=8, known_reference=8)
    eng.begin_generation()
    q, k, v, tk, tv = qkv(1, 20 * 6, L=3)
    for step in range(3):
        eng.set_step(step)
        for _layer in range(2):
            eng.attention(q, k, v, tk, tv)
    summary = eng.end_generation()
    err = capsys.readouterr().err
    lines = lvsa_lines(err)
    assert "[LVSA] reference_latent_frames=8 target_latent_frames=20 extension_ratio=2.50x" in lines
    assert any(ln.startswith("[LVSA] computed key_frame_interval=") for ln in lines)
    assert any(re.match(r"\[LVSA\] kfi=\d+ global_count=\d+ attended_per_frame=\d+/20", ln) for ln in lines)
    engaged = [ln for ln in lines if "engaged" in ln]
    assert len(engaged) == 1
    assert re.fullmatch(r"\[LVSA\] engaged \(hunyuan\): T_lat=20 P=6 seq_len=123 kfi=\d+ W=1 \|G\|=\d+ -> SPARSE",
                        engaged[0])
    assert sum(ln.startswith("[LVSA] reference_latent_frames=") for ln in lines) == 1
    assert sum(ln.startswith("[LVSA] kfi=") for ln in lines) == 1
    assert summary["sparse_calls"] == 6 and summary["fallbacks"] == 0
    assert summary["extension_ratio"] == 2.5
    # a second generation prints engaged again
    eng.begin_generation()
    eng.attention(q, k, v, tk, tv)
    assert sum("engaged" in ln for ln in lvsa_lines(capsys.readouterr().err)) == 1


def test_dense_by_design_line_and_exact_dense_output(fresh_plugins, capsys):
    eng = Engine(family="wan")
    eng.set_geometry(patches_per_frame=4)
    eng.begin_generation()
    q, k, v, _, _ = qkv(2, 21 * 4)
    out = eng.attention(q, k, v)
    assert torch.allclose(out, dense_attention(q, k, v))
    err = capsys.readouterr().err
    assert "[LVSA] engaged (wan): T_lat=21 P=4 seq_len=84 kfi=1 W=3 |G|=21 -> DENSE (T_lat <= ref)" in err
    assert eng.end_generation()["dense_calls"] == 1


def test_geometry_fallback_line_dedup_and_silencing(fresh_plugins, capsys, monkeypatch):
    eng = Engine(family="wan")
    eng.begin_generation()
    q, k, v, _, _ = qkv(1, 25740 // 20)  # 1287 tokens: not a multiple of 1560
    for _ in range(3):
        out = eng.attention(q, k, v, origin="forward_cuda")
    assert torch.allclose(out, dense_attention(q, k, v))
    err = capsys.readouterr().err
    fb = [ln for ln in err.splitlines() if ln.startswith("[LVSA-FALLBACK]")]
    assert fb == ["[LVSA-FALLBACK] origin=forward_cuda reason=geometry_detect seq_len=1287 known_ppf=[1560] "
                  "-- falling back to DENSE attention (set LVSA_WARN_FALLBACK=0 to silence)"]
    assert eng.end_generation()["fallbacks_by_reason"] == {"geometry_detect": 3}
    assert telemetry.SESSION.fallbacks_by_reason["geometry_detect"] == 3



@pytest.mark.parametrize("how", ["env", "config_json", "kwarg"])
def test_warn_fallback_off_silences_only_fallback_lines(fresh_plugins, capsys, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("LVSA_WARN_FALLBACK", "0")
        eng = Engine(family="wan")
    elif how == "config_json":
        monkeypatch.setenv("LVSA_CONFIG", '{"warn_fallback": false}')
        eng = Engine(family="wan")
    else:
        eng = Engine(family="wan", warn_fallback=False)
    eng.set_geometry(patches_per_frame=4, reference=2)
    q2, k2, v2, _, _ = qkv(1, 1289)
    eng.attention(q2, k2, v2)
    q, k, v, _, _ = qkv(1, 10 * 4)
    eng.attention(q, k, v)
    err = capsys.readouterr().err
    assert "[LVSA-FALLBACK]" not in err and "[LVSA] engaged (wan)" in err
    assert eng.end_generation()["fallbacks"] == 1  # still counted


def test_expected_frames_mismatch_is_a_geometry_fallback(fresh_plugins, capsys):
    eng = Engine(family="wan")
    eng.set_geometry(patches_per_frame=4, latent_frames=30)
    q, k, v, _, _ = qkv(1, 10 * 4)  # a warm-up pass with 10 frames
    eng.attention(q, k, v)
    err = capsys.readouterr().err
    assert ("[LVSA-FALLBACK] origin=forward_cpu reason=geometry_detect seq_len=40 known_ppf=[4] expected_T=30 "
            "found_T=10 -- falling back to DENSE attention") in err


def test_reference_mismatch_warns_loudly(fresh_plugins, capsys, monkeypatch):
    monkeypatch.setenv("LVSA_REFERENCE_LATENT_FRAMES", "21")
    eng = Engine(family="hunyuan")
    eng.set_geometry(patches_per_frame=4, reference=33, known_reference=33)
    assert eng.reference == 21  # the user's setting wins ...
    err = capsys.readouterr().err
    assert "[LVSA] WARNING reference_latent_frames=21 but this hunyuan model was trained at 33" in err


def test_rotation_follows_set_step(fresh_plugins):
    seen = []

    class Spy:
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_event(self, event):
            if event.kind == "plan_built":
                seen.append(event["offset"])

    from lvsa import plugins
    plugins.register_plugin(Spy(), name="spy")
    eng = Engine(family="wan", window_size=4)
    eng.set_geometry(patches_per_frame=3)
    q, k, v, _, _ = qkv(1, 40 * 3)
    kfi = eng.schedule(40, 3).key_frame_interval
    assert kfi > 2
    for step in range(kfi + 2):
        eng.set_step(step)
        eng.attention(q, k, v)
        eng.attention(q, k, v)  # a second layer in the same step: same mask
    assert seen == list(range(kfi))


def test_mask_mem_and_time_logs(fresh_plugins, capsys, monkeypatch):
    from lvsa import devices
    eng = Engine(family="wan", mask_log="1-2", mem_log=True, step_time_log=True, window_size=4)
    eng.set_geometry(patches_per_frame=2)
    monkeypatch.setattr(devices, "memory_stats", lambda d: {"device_kind": "cuda", "index": 0, "alloc": 41.2e9,
                                                            "reserved": 44e9, "peak": 47.9e9})
    monkeypatch.setattr(devices, "synchronize", lambda d: None)
    eng._last_device = torch.device("cuda:0")  # as if a GPU call had happened
    q, k, v, _, _ = qkv(1, 30 * 2)
    eng.begin_generation()
    for step in range(4):
        eng.set_step(step)
        eng._last_device = torch.device("cuda:0")
        eng.attention(q, k, v)
    eng.end_generation()
    err = capsys.readouterr().err
    masks = re.findall(r"\[LVSA-MASK\] step=(\d+)", err)
    assert masks == ["1", "2"]
    assert "[LVSA-MEM] step=3 cuda=0 alloc=41.20GB reserved=44.00GB peak=47.90GB" in err
    assert len(re.findall(r"\[LVSA-TIME\] step=\d+ dt=\d+\.\d{3}s", err)) == 4


def test_session_summary_line(fresh_plugins):
    eng = Engine(family="wan", window_size=4)
    eng.set_geometry(patches_per_frame=2)
    q, k, v, _, _ = qkv(1, 30 * 2)
    eng.attention(q, k, v)
    eng.attention(*qkv(1, 7)[:3])
    s = telemetry.session_summary()
    assert s["sparse_calls"] == 1 and s["fallbacks"] == 1
    assert telemetry.SESSION.line().startswith("engaged: 1 sparse calls, 0 dense-by-design calls, 1 fallbacks")


def test_engine_validates_every_path(fresh_plugins):
    from lvsa.ops import LVSAInputError
    eng = Engine(family="wan", check=True)
    eng.set_geometry(patches_per_frame=4)
    q, k, v, _, _ = qkv(2, 21 * 4)  # dense by design
    with pytest.raises(LVSAInputError, match="batch"):
        eng.attention(q, k[:1], v[:1])
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(LVSAInputError, match="^q holds 1 non-finite"):
        eng.attention(q, k, v)
    q2, k2, v2, _, _ = qkv(1, 7)  # geometry fallback path
    with pytest.raises(LVSAInputError, match="cast all three"):
        eng.attention(q2, k2.double(), v2.double())


@pytest.mark.parametrize("spec,want", [("once", [0]), ("2", [2]), ("0,3", [0, 3]), ("1", [0, 1, 2, 3])])
def test_mask_log_specs_through_the_engine(fresh_plugins, capsys, spec, want):
    eng = Engine(family="wan", mask_log=spec, window_size=4)
    eng.set_geometry(patches_per_frame=2)
    q, k, v, _, _ = qkv(1, 30 * 2)
    for step in range(4):
        eng.set_step(step)
        eng.attention(q, k, v)
        eng.attention(q, k, v)
    got = [int(x) for x in re.findall(r"\[LVSA-MASK\] step=(\d+)", capsys.readouterr().err)]
    assert got == want


def test_direct_attention_calls_are_counted(fresh_plugins):
    import lvsa
    m = lvsa.plan_schedule(30, 1, 1, 4).mask(0)
    q, k, v, _, _ = qkv(1, 30 * 2)
    for _ in range(3):
        lvsa.attention(q, k, v, m)
    s = telemetry.session_summary()
    assert s["sparse_calls"] == 3 and s["backend_calls"] == {"reference": 3}


def test_short_window_setting_warns(fresh_plugins, capsys):
    Engine(family="wan", window_size=3)
    assert "window_size=3 video frames is W=0 latent frames" in capsys.readouterr().err


def test_a_step_opened_by_the_last_callback_is_not_timed(fresh_plugins, capsys):
    eng = Engine(family="wan", step_time_log=True, window_size=4)
    eng.set_geometry(patches_per_frame=2)
    q, k, v, _, _ = qkv(1, 30 * 2)
    eng.begin_generation()
    for step in range(3):
        eng.set_step(step)
        eng.attention(q, k, v)
    eng.set_step(3)  # the step callback after the last step
    eng.end_generation()
    steps = re.findall(r"\[LVSA-TIME\] step=(\d+)", capsys.readouterr().err)
    assert steps == ["0", "1", "2"]


def test_one_record_of_a_generations_counts(fresh_plugins, monkeypatch):
    """A backend error in auto mode is one fallback, counted once in the generation's
    record and once in the session (one path feeds both), and the sink prints it once."""
    from lvsa import dispatch, plugins
    from lvsa.backends.reference import ReferenceBackend
    from lvsa.hookspecs import hookimpl

    class Boom(ReferenceBackend):
        name = "boom"
        priority = {"cpu": 50}

        def run(self, plan, *a, **kw):
            raise RuntimeError("boom")

    class P:
        @hookimpl
        def lvsa_register_backends(self, register):
            register(Boom())

    plugins.register_plugin(P())
    dispatch.clear_caches()
    eng = Engine(family="wan", window_size=4)
    eng.set_geometry(patches_per_frame=2)
    q, k, v, _, _ = qkv(1, 30 * 2)
    eng.attention(q, k, v)          # boom raises: reference runs, one backend_error fallback
    eng.attention(q, k, v)          # boom is demoted for this problem: reference, no fallback
    eng.attention(*qkv(1, 7)[:3])   # geometry fallback
    s = eng.end_generation()
    assert (s["sparse_calls"], s["fallbacks"]) == (2, 2)
    assert s["fallbacks_by_reason"] == {"backend_error": 1, "geometry_detect": 1}
    sess = telemetry.session_summary()
    assert (sess["sparse_calls"], sess["fallbacks"]) == (2, 2)
    assert sess["fallbacks_by_reason"] == s["fallbacks_by_reason"]
    assert sess["backend_calls"] == {"reference": 2}
    eng.begin_generation()
    assert eng.end_generation()["fallbacks"] == 0 and telemetry.session_summary()["fallbacks"] == 2


def test_print_once_is_the_sinks_rule(fresh_plugins, capsys):
    """Every repeated fallback is still emitted (sinks see each one); the default sink alone
    decides that its line is printed once."""
    from lvsa import plugins

    seen = []

    class Rec:
        from lvsa.hookspecs import hookimpl

        @hookimpl
        def lvsa_event(self, event):
            if event.kind == "fallback":
                seen.append(event["reason"])

    plugins.register_plugin(Rec())
    eng = Engine(family="wan")
    for _ in range(3):
        eng.attention(*qkv(1, 7)[:3])
    assert seen == ["geometry_detect"] * 3
    assert capsys.readouterr().err.count("[LVSA-FALLBACK]") == 1


def test_key_frame_interval_is_in_video_frames(fresh_plugins, monkeypatch):
    """LVSA_KEY_FRAME_INTERVAL counts video frames like the window and the first frames
    (16 = 4 latent frames at the VAE's temporal factor 4)."""
    from lvsa.config import Config

    monkeypatch.setenv("LVSA_AUTO_KEYFRAMES", "0")
    monkeypatch.setenv("LVSA_KEY_FRAME_INTERVAL", "16")
    eng = Engine(family="wan", config=Config.load())
    assert eng.schedule(81, 2).key_frame_interval == 4
    eng = Engine(family="wan", config=Config.load(vae_temporal_factor=8))
    assert eng.schedule(81, 2).key_frame_interval == 2
    monkeypatch.setenv("LVSA_KEY_FRAME_INTERVAL", "2")
    with pytest.raises(ValueError, match=r"LVSA_KEY_FRAME_INTERVAL=2 is in video frames.*multiple of 4"):
        Config.load()
    monkeypatch.delenv("LVSA_KEY_FRAME_INTERVAL")
    assert Engine(family="wan", config=Config.load()).schedule(81, 2).key_frame_interval == 4  # default 16
