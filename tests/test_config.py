"""Config: precedence, bad values, deprecation, geometry detection."""
import json
import warnings

import pytest

from lvsa.config import Config, detect_geometry, env_table, mask_log_wants, parse_mask_log


def test_defaults_match_design():
    c = Config.load(env={})
    assert (c.window_size, c.n_first_frames, c.key_frame_interval) == (12, 4, 16)
    assert c.auto_keyframes and c.rotate_keyframes and c.expand_window
    assert c.sparsity_scale == 1.0 and c.backend == "auto"
    assert (c.vae_spatial_factor, c.patch_size, c.vae_temporal_factor) == (8, 2, 4)
    assert c.latent_window() == 3 and c.latent_first_frames() == 1
    assert c.reference_for("hunyuan") == 33 and c.reference_for("cogvideox") == 13
    assert c.reference_for("wan") == 21 and c.candidate_ppf() == (1560,)


def test_precedence_kwargs_over_config_json_over_env():
    env = {"LVSA_WINDOW_SIZE": "16", "LVSA_SPARSITY_SCALE": "0.8", "LVSA_BACKEND": "reference",
           "LVSA_CONFIG": json.dumps({"window_size": 20, "LVSA_N_FIRST_FRAMES": 8})}
    c = Config.load(env=env)
    assert c.window_size == 20 and c.n_first_frames == 8 and c.sparsity_scale == 0.8
    assert c.sources["window_size"] == "LVSA_CONFIG" and c.sources["sparsity_scale"] == "LVSA_SPARSITY_SCALE"
    c2 = Config.load(env=env, window_size=24, sparsity_scale=None)
    assert c2.window_size == 24 and c2.sources["window_size"] == "argument"
    assert c2.sparsity_scale == 0.8  # None means "not given"


@pytest.mark.parametrize("var,value,allowed", [
    ("LVSA_WINDOW_SIZE", "abc", "integer"), ("LVSA_WINDOW_SIZE", "-1", "integer >= 0"),
    ("LVSA_SPARSITY_SCALE", "0", "> 0"), ("LVSA_SPARSITY_SCALE", "-2", "> 0"),
    ("LVSA_SPARSITY_SCALE", "nan", "> 0"), ("LVSA_KEY_FRAME_INTERVAL", "0", ">= 1"),
    ("LVSA_AUTO_KEYFRAMES", "maybe", "1/0"), ("LVSA_PATCHES_PER_FRAME", "1560,abc", "comma list"),
    ("LVSA_PATCHES_PER_FRAME", "", "comma list"), ("LVSA_MASK_LOG", "5-2", "N-M"),
    ("LVSA_MASK_LOG", "x", "once"), ("LVSA_REFERENCE_LATENT_FRAMES", "0", ">= 1"),
    ("LVSA_BACKEND", "tri ton", "backend name"), ("LVSA_STRICT", "2", "1/0")])
def test_bad_env_values_name_variable_value_and_allowed(var, value, allowed):
    with pytest.raises(ValueError) as e:
        Config.load(env={var: value})
    msg = str(e.value)
    assert var in msg and repr(value) in msg and allowed in msg


def test_bad_config_json():
    with pytest.raises(ValueError, match="LVSA_CONFIG is not valid JSON"):
        Config.load(env={"LVSA_CONFIG": "{window"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        Config.load(env={"LVSA_CONFIG": "[1]"})
    with pytest.raises(ValueError, match="unknown key 'windw_size'"):
        Config.load(env={"LVSA_CONFIG": '{"windw_size": 3}'})
    with pytest.raises(ValueError, match=r"LVSA_CONFIG\['sparsity_scale'\]"):
        Config.load(env={"LVSA_CONFIG": '{"sparsity_scale": -1}'})
    with pytest.raises(ValueError, match="unknown lvsa setting 'bogus'"):
        Config.load(env={}, bogus=1)


def test_schedule_vars_deprecated(capsys, fresh_plugins):
    from lvsa.engine import Engine

    with pytest.warns(DeprecationWarning, match="LVSA_SPARSITY_SCALE"):
        cfg = Config.load(env={"LVSA_SCHEDULE_START": "0.2"})
    assert cfg.deprecation_notices()
    Engine(config=cfg)  # the runtime prints the notice (the data layer only warns)
    assert "[LVSA] WARNING LVSA_SCHEDULE_START=0.2 is deprecated" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config.load(env={"LVSA_SCHEDULE_START": "0", "LVSA_SCHEDULE_END": "0"})


def test_key_frame_interval_unit_notice(capsys, fresh_plugins):
    """LVSA_KEY_FRAME_INTERVAL counts video frames now: users who set it get one [LVSA] line
    with the unit and the latent interval it became; the schedule is what it was."""
    from lvsa.doctor import diagnose_text
    from lvsa.engine import Engine

    env = {"LVSA_KEY_FRAME_INTERVAL": "24", "LVSA_AUTO_KEYFRAMES": "0"}
    engines = [Engine(family="wan", config=Config.load(env=env)) for _ in range(3)]
    err = capsys.readouterr().err
    line = ("[LVSA] LVSA_KEY_FRAME_INTERVAL=24 is in video frames (earlier lvsa builds read latent frames): "
            "fixed keyframe interval 6 latent frames (24 // vae_temporal_factor 4)\n")
    assert err.count("[LVSA] LVSA_KEY_FRAME_INTERVAL=") == 1 and line in err  # once per process
    assert engines[0].schedule(41, 16).key_frame_interval == 6                 # semantics unchanged
    assert not diagnose_text(err + "[LVSA] engaged (wan): T_lat=41 P=16 seq_len=656 kfi=6 W=3 |G|=7 -> SPARSE\n"
                             ).findings                                        # information, no finding
    Engine(config=Config.load(env={"LVSA_CONFIG": '{"key_frame_interval": 32}'}))
    assert ("[LVSA] LVSA_CONFIG key_frame_interval=32 is in video frames (earlier lvsa builds read latent "
            "frames): fixed keyframe interval 8 latent frames (32 // vae_temporal_factor 4); unused while "
            "LVSA_AUTO_KEYFRAMES=1\n") in capsys.readouterr().err
    Engine(config=Config.load(env={}))
    Engine(config=Config.load(env={}), key_frame_interval=20)  # a Python argument: no variable, no line
    assert "key_frame_interval" not in capsys.readouterr().err


def test_candidate_ppf_sources():
    assert Config.load(env={"LVSA_PATCHES_PER_FRAME": "880, 1560"}).candidate_ppf() == (880, 1560)
    c = Config.load(env={"LVSA_VIDEO_HEIGHT": "704", "LVSA_VIDEO_WIDTH": "1280",
                         "LVSA_VAE_SPATIAL_FACTOR": "16"})
    assert c.candidate_ppf() == (880,)
    both = Config.load(env={"LVSA_PATCHES_PER_FRAME": "100", "LVSA_VIDEO_HEIGHT": "480",
                            "LVSA_VIDEO_WIDTH": "832"})
    assert both.candidate_ppf() == (100,)
    with pytest.raises(ValueError, match="together"):
        Config.load(env={"LVSA_VIDEO_HEIGHT": "480"}).candidate_ppf()
    with pytest.raises(ValueError, match="LVSA_VIDEO_HEIGHT/LVSA_VIDEO_WIDTH.*divisible"):
        Config.load(env={"LVSA_VIDEO_HEIGHT": "481", "LVSA_VIDEO_WIDTH": "832"}).candidate_ppf()


def test_geometry_detection():
    g = detect_geometry(81 * 1560, (1560,))
    assert g.ok and (g.T, g.P) == (81, 1560)
    g = detect_geometry(33 * 1560 + 256, (1560,), text_len=256)
    assert g.ok and g.T == 33
    g = detect_geometry(25740, (1560,))
    assert not g.ok and g.reason == "geometry_detect" and g.detail == {"known_ppf": [1560]}
    g = detect_geometry(100, (1560,), text_len=100)
    assert g.reason == "no_t_lat"
    g = detect_geometry(21 * 880, (1560, 880))
    assert (g.T, g.P) == (21, 880)
    assert detect_geometry(21 * 1560, (1560,), total_latent_frames=21).ok
    g = detect_geometry(21 * 1560 + 1, (1560,), total_latent_frames=21)
    assert g.reason == "no_t_lat"


def test_mask_log_spec():
    assert parse_mask_log("V", "1") == ("all",) and parse_mask_log("V", "0") is None
    once = parse_mask_log("V", "once")
    assert mask_log_wants(once, 3, False) and not mask_log_wants(once, 4, True)
    r = parse_mask_log("V", "2-4")
    assert [s for s in range(7) if mask_log_wants(r, s, False)] == [2, 3, 4]
    k = parse_mask_log("V", "0,5,9")
    assert [s for s in range(10) if mask_log_wants(k, s, False)] == [0, 5, 9]
    assert mask_log_wants(parse_mask_log("V", "3"), 3, True)


def test_env_table_lists_every_variable():
    t = env_table()
    for var in ("LVSA_WINDOW_SIZE", "LVSA_MASK_LOG", "LVSA_SCHEDULE_END", "LVSA_CHECK", "LVSA_STRICT"):
        assert var in t
