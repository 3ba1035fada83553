"""``lvsa doctor``: sample logs from lvsa's own output and in the published format, the
geometry arithmetic, warm-up separation, JSON, exit codes, unreadable input, ``--env``."""
import json
import os
import re
import subprocess
import sys

import pytest

from lvsa import devices
from lvsa.cli import main
from lvsa.doctor import UnreadableInput, check_environment, diagnose_text, parse_log
from lvsa.doctor import fit

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "doctor")
PUBLISHED = os.path.join(DATA, "published")

# lvsa's own output (tests/data/doctor/make_logs.py) -> the problem ids and the notes expected
OWN = {
    "healthy-wan": ([], []),
    "dense-by-design-wan": ([], ["dense-by-design"]),
    "geometry-detect-wan": (["geometry-detect"], []),
    "geometry-detect-hunyuan": (["geometry-detect"], []),
    "no-t-lat-wan": (["no-t-lat"], []),
    "reference-mismatch-hunyuan": (["reference-mismatch"], []),
    "deprecated-schedule-wan": (["deprecated-schedule"], []),
    "decode-oom-cogvideox": (["decode-oom"], []),
    "container-export-wan": (["export-host-path"], []),
    "no-lvsa-wan": ([], ["dense-baseline"]),
    "silenced-fallbacks-wan": (["fallbacks-silenced"], []),
    "window-below-latent-frame-wan": (["lvsa-warning"], []),
}
# hand-written, published format -> problems, notes
HAND = {
    "vllm-wan-sharded": (["wan-hook-missing"], []),
    "vllm-backend-not-selected": (["vllm-backend-not-selected"], []),
    "standalone-no-lvsa-lines": (["no-lvsa-lines"], []),
    "vllm-warmup-then-sparse": ([], ["warmup-fallbacks"]),
    "vllm-warmup-and-720p": (["geometry-detect"], ["warmup-fallbacks"]),
    "no-t-lat": (["wan-hook-missing"], []),
    "dense-at-reference": ([], ["dense-by-design"]),
    "hunyuan-reference-21": (["reference-mismatch"], []),
    "reference-21-no-model-name": (["reference-mismatch"], []),
    "decode-oom-traceback": (["decode-oom"], []),
    "oom-during-denoising": (["no-lvsa-lines", "oom-denoising"], []),
    "docker-export-host-path": (["export-host-path"], ["dense-by-design"]),
    "docker-export-bind-mount": ([], []),
    "schedule-env": (["deprecated-schedule"], []),
    "quality-metrics": ([], ["motion-quality"]),
    "backend-error": (["fallback-backend-error"], []),
    "slow-backend": (["slow-backend"], []),
    # lvsa on the H200: tiny model in float32 (fast kernels refuse it), latent to /tmp in a container
    "h200-tiny-wan-float32": (["export-host-path", "slow-backend"], []),
    # the troubleshooting guide's own lines, "seq_len=…" included
    "guide-lines": (["geometry-detect", "no-t-lat", "reference-mismatch"], []),
}


@pytest.fixture(autouse=True)
def no_installed_vllm_omni(monkeypatch):
    """The samples name their vllm-omni (or not); the one installed here must not decide."""
    from lvsa.doctor import versions

    monkeypatch.setattr(versions, "installed_vllm_omni", lambda: None)


def _path(name):
    p = os.path.join(DATA, name + ".log")
    return p if os.path.exists(p) else os.path.join(PUBLISHED, name + ".log")


def _doctor(*argv):
    from io import StringIO
    import contextlib

    out, err = StringIO(), StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["doctor", *argv])
    return rc, out.getvalue(), err.getvalue()


def _diag(name):
    with open(_path(name), "rb") as fh:
        return diagnose_text(fh.read(), name)


def test_every_sample_is_present():
    names = {f[:-4] for f in os.listdir(DATA) if f.endswith(".log")}
    assert names == set(OWN)
    assert {f[:-4] for f in os.listdir(PUBLISHED) if f.endswith(".log")} == set(HAND)


@pytest.mark.parametrize("name", sorted(OWN) + sorted(HAND))
def test_sample_findings_and_exit_code(name):
    problems, notes = {**OWN, **HAND}[name]
    d = _diag(name)
    assert sorted(f.id for f in d.problems) == sorted(problems)
    assert sorted(f.id for f in d.findings if f.severity == "note") == sorted(notes)
    rc, out, _ = _doctor(_path(name))
    assert rc == (1 if problems else 0)
    if problems:
        for f in d.problems:
            assert f"<{f.id}>" in out and f.fix and f.cause
    else:
        assert "clean bill" in out


@pytest.mark.parametrize("name", sorted(OWN) + sorted(HAND))
def test_evidence_quotes_the_numbered_lines(name):
    with open(_path(name), encoding="utf-8", newline="") as fh:  # keep \r: progress bars redraw in place
        lines = fh.read().split("\n")
    for f in _diag(name).findings:
        for n, text in f.evidence:
            assert text and text in lines[n - 1], (f.id, n, text)


def _fix(d, id_):
    return "\n".join(next(f for f in d.findings if f.id == id_).fix)


def test_geometry_arithmetic_from_lvsa_output():
    # tiny-wan at 64x64 (P=16) with LVSA_PATCHES_PER_FRAME=1560: the summary's T_lat/P decide
    d = _diag("geometry-detect-wan")
    assert "export LVSA_PATCHES_PER_FRAME=16" in _fix(d, "geometry-detect")
    assert "T=25 latent frames" in d.findings[0].cause
    # HunyuanVideo joins text: 624 = 37 frames x 16 + 32 prompt tokens
    d = _diag("geometry-detect-hunyuan")
    cause = d.findings[0].cause
    assert "T=37" in cause and "P=16" in cause and "32 text tokens" in cause
    assert "export LVSA_PATCHES_PER_FRAME=16" in _fix(d, "geometry-detect")


def test_geometry_arithmetic_published_lines():
    # 147600 = 41 x 3600: 161 frames at 720x1280 (VAE 8, patch 2)
    fx = _fix(_diag("vllm-warmup-and-720p"), "geometry-detect")
    assert "export LVSA_PATCHES_PER_FRAME=3600" in fx
    assert "LVSA_VIDEO_HEIGHT=720 LVSA_VIDEO_WIDTH=1280" in fx
    # the guide's own line: 25740 is half of 33 x 1560 (Wan, sequence parallel 2)
    d = _diag("vllm-wan-sharded")
    assert "1/2 of T=33" in d.findings[0].cause and "51480" in d.findings[0].cause
    assert "export LVSA_WAN_HOOK=1" in _fix(d, "wan-hook-missing")


def test_fit_units_text_and_shards():
    # Wan 2.2 TI2V-5B: 704x1280 with VAE spatial 16, patch 2 -> P=880, not a default factor pair
    f = fit.fits(31 * 880, [1560], "wan")[0]
    assert (f.T, f.P, f.height, f.width) == (31, 880, 704, 1280)
    assert f.resolution_env() == ["LVSA_VIDEO_HEIGHT=704", "LVSA_VIDEO_WIDTH=1280",
                                  "LVSA_VAE_SPATIAL_FACTOR=16", "LVSA_PATCH_SIZE=2"]
    # CogVideoX joins 226 text tokens: 13 frames of 480x720 (P=1350)
    f = fit.fits(13 * 1350 + 226, [1560], "cogvideox")[0]
    assert (f.T, f.P, f.text) == (13, 1350, 226)
    # HunyuanVideo 1.5 at 720x1280 (VAE 16, patch 1) with 180 valid prompt tokens
    f = fit.fits(33 * 3600 + 180, [1560], "hunyuan")[0]
    assert (f.T, f.P, f.text, f.height, f.width) == (33, 3600, 180, 720, 1280)
    # a quarter of 41 x 1560 (Ulysses 4)
    f = fit.fits(41 * 1560 // 4, [1560], "wan")[0]
    assert (f.shard, f.T, f.P) == (4, 41, 1560)
    # nothing common fits a prime: no invented answer
    assert fit.fits(100003, [1560], "wan") == []


def test_backend_refusals_get_their_own_fix():
    d = _diag("h200-tiny-wan-float32")
    fx = _fix(d, "slow-backend")
    assert "--dtype bfloat16" in fx and "head size" in fx and "pip install" not in fx
    assert "--output-latent outputs/tiny.pt" in _fix(d, "export-host-path")
    assert "pip install 'lvsa-cuda[flashinfer]'" in _fix(_diag("slow-backend"), "slow-backend")


def test_warmup_separated_by_sequence_length():
    d = _diag("vllm-warmup-and-720p")
    gen = next(f for f in d.findings if f.id == "geometry-detect")
    warm = next(f for f in d.findings if f.id == "warmup-fallbacks")
    assert [n for n, _ in gen.evidence] == [6] and [n for n, _ in warm.evidence] == [4]
    assert d.facts["fallbacks"] == {"generation": 1, "warmup": 1}
    # the same warm-up line alone, with a healthy generation after it: healthy
    assert _diag("vllm-warmup-then-sparse").healthy


def test_a_fallback_after_the_generation_is_not_warmup():
    text = ("[LVSA] engaged (wan): T_lat=41 P=1560 seq_len=63960 kfi=3 W=3 |G|=15 -> SPARSE\n"
            "[LVSA-FALLBACK] origin=forward_cuda reason=geometry_detect seq_len=1024 known_ppf=[1560]\n")
    d = diagnose_text(text)
    assert [f.id for f in d.problems] == ["geometry-detect"]


def test_json_output():
    rc, out, _ = _doctor(_path("reference-mismatch-hunyuan"), "--json")
    assert rc == 1
    d = json.loads(out)
    assert d["healthy"] is False and d["facts"]["family"] == "hunyuan"
    f = d["findings"][0]
    assert f["id"] == "reference-mismatch" and f["severity"] == "problem"
    assert "export LVSA_REFERENCE_LATENT_FRAMES=33   # HunyuanVideo 1.5" in f["fix"]
    assert all(isinstance(e["line"], int) for e in f["evidence"])
    rc, out, _ = _doctor(_path("healthy-wan"), "--json")
    assert rc == 0 and json.loads(out) == {**json.loads(out), "healthy": True, "findings": []}


def test_stdin(monkeypatch):
    import io

    with open(_path("no-t-lat-wan"), "rb") as fh:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(fh.read())))
    rc, out, _ = _doctor("-")
    assert rc == 1 and "<no-t-lat>" in out and "<stdin>" in out


@pytest.mark.parametrize("data, words", [
    (b"", "empty"), (b"  \n\n \t\n", "empty"), (b"\x00\x01\x02binary\x00" * 20, "binary"),
    (bytes(range(128, 256)) * 4, "does not decode as text"),
    (b"hello world\nthis is a shopping list\nmilk\n", "nothing in these 3 lines looks like"),
])
def test_unreadable_input(tmp_path, data, words):
    with pytest.raises(UnreadableInput, match=words):
        parse_log(data, "x")
    p = tmp_path / "x.log"
    p.write_bytes(data)
    rc, out, err = _doctor(str(p))
    assert rc == 2 and words in err and out == ""


def test_missing_file_and_no_argument(tmp_path):
    rc, _, err = _doctor(str(tmp_path / "nope.log"))
    assert rc == 2 and "cannot read" in err
    rc, _, err = _doctor()
    assert rc == 2 and "--env" in err


def test_parser_fields_and_progress_redraws():
    log = parse_log(b"denoising:  50%|#####     | 1/2 [00:00<00:00]\rdenoising: 100%|##########| 2/2 [00:01<00:00]"
                    b"[LVSA-FALLBACK] origin=forward_cuda reason=backend_error seq_len=10 backend=triton "
                    b"error='A: b c' -- falling back to the REFERENCE backend (set LVSA_WARN_FALLBACK=0 to silence)\n")
    prog = log.of("progress")
    assert len(prog) == 1 and (prog[0].get("n"), prog[0].get("total")) == (2, 2)
    fb = log.first("fallback")
    assert fb.lineno == 1 and fb.fields["error"] == "A: b c" and fb.fields["backend"] == "triton"
    assert fb.text.startswith("[LVSA-FALLBACK]")


# ------------------------------------------------------------ regenerated from lvsa
_VOLATILE = [(re.compile(r"\d+\.\d+(s|GB|x)?\b"), r"<n>\1"), (re.compile(r"\b\d+MB\b"), "<n>MB")]
_LVSA_KINDS = ("lvsa_line", "export", "decode_oom", "decode_hint", "container_warning", "generate_done",
               "generate_summary")


def _lvsa_lines(text: str):
    out = []
    for r in parse_log(text.encode(), "x").of(*_LVSA_KINDS):
        s = r.text.strip()
        for pat, rep in _VOLATILE:
            s = pat.sub(rep, s)
        out.append(s)
    return out


def test_committed_logs_are_what_lvsa_prints_now(tmp_path):
    """Run make_logs.py again (one process, every scenario) and compare lvsa's lines."""
    script = os.path.join(DATA, "make_logs.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for k in [k for k in env if k.startswith("LVSA_") and k != "LVSA_CHECK"]:
        env.pop(k)
    r = subprocess.run([sys.executable, script, "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in OWN:
        with open(_path(name), encoding="utf-8", newline="") as fh:
            committed = fh.read()
        fresh = (tmp_path / f"{name}.log").read_bytes().decode("utf-8")
        assert _lvsa_lines(fresh) == _lvsa_lines(committed), name
        assert [f.id for f in diagnose_text(fresh).findings] == [f.id for f in diagnose_text(committed).findings]


# ------------------------------------------------------------------ --env
def _env_ids(env, model=None, severity="problem"):
    d = check_environment(env=env, model=model)
    return sorted(f.id for f in d.findings if f.severity == severity), d


def test_env_every_bad_value_reported():
    ids, d = _env_ids({"LVSA_WINDOW_SIZE": "abc", "LVSA_SPARSITY_SCALE": "-1", "LVSA_CONFIG": "{bad"})
    assert ids == ["env-invalid"] * 3
    text = " ".join(f.cause for f in d.findings)
    assert "LVSA_WINDOW_SIZE='abc'" in text and "LVSA_SPARSITY_SCALE='-1'" in text and "LVSA_CONFIG" in text


def test_env_contradictions_and_typos():
    ids, d = _env_ids({"LVSA_PATCHES_PER_FRAME": "1560", "LVSA_VIDEO_HEIGHT": "720", "LVSA_VIDEO_WIDTH": "1280"})
    assert ids == ["env-contradiction"] and "P=3600" in d.problems[0].cause
    ids, _ = _env_ids({"LVSA_VIDEO_HEIGHT": "720"})
    assert ids == ["env-contradiction"]
    ids, d = _env_ids({"LVSA_WINDOWSIZE": "16"})
    assert ids == ["env-unknown"] and "LVSA_WINDOW_SIZE" in d.problems[0].cause
    ids, _ = _env_ids({"LVSA_WINDOW_SIZE": "2"})
    assert ids == ["env-contradiction"]
    ids, _ = _env_ids({"LVSA_SCHEDULE_START": "0.5"})
    assert ids == ["deprecated-schedule"]
    notes, _ = _env_ids({"LVSA_AUTO_KEYFRAMES": "1", "LVSA_KEY_FRAME_INTERVAL": "16", "LVSA_WARN_FALLBACK": "0"},
                        severity="note")
    assert {"env-ignored", "env-fallbacks-hidden"} <= set(notes)


def test_env_contradictions_read_the_environment_without_the_bad_variables():
    from lvsa.doctor.envcheck import check_contradictions

    env = {"LVSA_AUTO_KEYFRAMES": "1", "LVSA_KEY_FRAME_INTERVAL": "16", "LVSA_WINDOW_SIZE": "x"}
    assert [f.id for f in check_contradictions(env, ["LVSA_WINDOW_SIZE"])] == ["env-ignored"]
    # a bad variable not named in `bad` makes the whole configuration unreadable: nothing to compare
    assert check_contradictions(env, []) == []


def test_env_backend_declared_settings_are_parsed():
    from lvsa import plugins

    assert "LVSA_TRITON_CONFIG" in {st.env for st in plugins.declared_settings()}  # lvsa-cuda is installed
    ids, d = _env_ids({"LVSA_TRITON_CONFIG": "garbage", "LVSA_JSONL_PATH": "/tmp/x.jsonl"})
    assert ids == ["env-invalid"] and "LVSA_TRITON_CONFIG='garbage'" in d.problems[0].cause


def test_env_reference_for_model():
    assert _env_ids({"LVSA_REFERENCE_LATENT_FRAMES": "21"}, "hunyuan")[0] == ["reference-mismatch"]
    assert _env_ids({"LVSA_REFERENCE_LATENT_FRAMES": "21"}, "wan")[0] == []
    assert _env_ids({"LVSA_REFERENCE_LATENT_FRAMES": "21"}, "wan2.2-ti2v-5b")[0] == ["reference-mismatch"]
    notes, _ = _env_ids({}, "cogvideox", severity="note")
    assert "reference-unset" in notes


def test_env_backends_use_lvsa_info_reasons():
    from lvsa.commands.info import gather_info

    info = gather_info()
    ids, d = _env_ids({"LVSA_BACKEND": "triton"})
    rows = {b["name"]: b for b in info["backends"]}
    if rows.get("triton", {}).get("reasons"):
        assert "backend-cannot-run" in ids
        f = next(f for f in d.findings if f.id == "backend-cannot-run")
        assert [e for _, e in f.evidence] == [f"triton: {r}" for r in rows["triton"]["reasons"]]
    else:
        assert "backend-cannot-run" not in ids
    ids, _ = _env_ids({"LVSA_BACKEND": "nosuch"})
    assert ids == ["backend-unknown"]


def test_env_broken_torch_npu(monkeypatch):
    broken = devices.NpuStatus(True, False, False, reason="torch_npu is installed but fails to import "
                               "(ImportError: libhccl.so: cannot open shared object file)")
    monkeypatch.setattr(devices, "npu_status", lambda *a, **k: broken)
    ids, d = _env_ids({})
    assert ids == ["torch-npu-broken"] and "libhccl.so" in d.problems[0].cause


def test_env_cli_clean(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LVSA_")]:
        monkeypatch.delenv(k)
    rc, out, _ = _doctor("--env", "--json")
    d = json.loads(out)
    assert rc == (0 if d["healthy"] else 1) and d["source"] == "--env"
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "twelve")
    rc, out, _ = _doctor("--env")
    assert rc == 1 and "<env-invalid>" in out and "LVSA_WINDOW_SIZE" in out


def test_a_failing_rule_does_not_hide_the_others(monkeypatch):
    from lvsa.doctor import findings

    def boom(self, log, ctx):
        raise RuntimeError("rule bug")

    monkeypatch.setattr(findings.MotionQuality, "check", boom)
    d = _diag("no-t-lat-wan")
    assert [f.id for f in d.problems] == ["no-t-lat"]
    err = next(f for f in d.findings if f.id == "doctor-rule-error")
    assert "motion-quality" in err.symptom and "rule bug" in err.cause


def test_the_vllm_omni_plugins_own_lines():
    """Every fallback line lvsa-vllm-omni prints gets a cause of its own, not 'unknown reason'."""
    tail = " -- falling back to DENSE attention (set LVSA_WARN_FALLBACK=0 to silence)"
    lines = [
        "[LVSA-FALLBACK] origin=lvsa_vllm_omni.register reason=vllm_omni_version seq_len=- found=0.31.0 "
        "supported=>=0.30,<0.31",
        "[LVSA-FALLBACK] origin=forward_cuda reason=no_geometry seq_len=101656 why=video_spans=0",
        "[LVSA-FALLBACK] origin=ring_attention reason=ring_parallel seq_len=126360",
        "[LVSA-FALLBACK] origin=forward_cuda reason=kv_length_mismatch seq_len=63180 kv_len=126360",
        "[LVSA-FALLBACK] origin=forward_npu reason=unsupported_metadata seq_len=63180 field=query_ranges",
    ]
    d = diagnose_text("\n".join(line + tail for line in lines) + "\n")
    causes = {f.id: f.cause for f in d.findings}
    for reason in ("vllm-omni-version", "no-geometry", "ring-parallel", "kv-length-mismatch",
                   "unsupported-metadata"):
        assert f"fallback-{reason}" in causes, sorted(causes)
        assert "does not know" not in causes[f"fallback-{reason}"]
    assert "Ulysses" in _fix(d, "fallback-ring-parallel")
    assert "query_ranges" in causes["fallback-unsupported-metadata"]


# ------------------------------------------------------------------ the fa4 backend's failure modes
def _fa4_reason(monkeypatch, import_error=None, missing=False):
    from lvsa.backend import Problem
    from lvsa_cuda import fa4_backend as fa

    import torch
    be = fa.FA4Backend()
    monkeypatch.setattr(be, "missing_packages", lambda: ["flash_attn"] if missing else [])
    monkeypatch.setattr(fa, "_import_error", lambda: import_error)
    monkeypatch.setattr(fa, "dist_version", lambda *d: "4.0.0b36" if d == ("flash-attn-4",) else "?")
    p = Problem("cuda", torch.bfloat16, 1, 81 * 1560, 12, 12, 128, T=81, P=1560, compute_capability=(9, 0))
    return be.not_supported_reasons(p)


def _selection_line(backend, refused):
    """The selection line exactly as lvsa's default sink prints it."""
    import contextlib
    from io import StringIO

    from lvsa import telemetry

    err = StringIO()
    with contextlib.redirect_stderr(err):
        telemetry.emit("selection", backend=backend, device="cuda", refused=refused, why="", shape="")
    return err.getvalue()


def test_doctor_log_names_a_broken_fa4_install_and_its_fix(monkeypatch):
    why = _fa4_reason(monkeypatch, "ModuleNotFoundError: No module named 'tvm_ffi'")
    log = _selection_line("flashinfer", {"fa4": why})
    assert log.startswith("[LVSA] backend=flashinfer (auto on cuda) refused: fa4: ")
    d = diagnose_text(log.encode(), "fa4-broken")
    assert [f.id for f in d.problems] == ["backend-broken"]
    f = d.problems[0]
    assert "the fa4 backend is installed but does not import" in f.symptom and "tvm_ffi" in f.cause
    fx = _fix(d, "backend-broken")
    assert "python -c 'import flash_attn.cute'" in fx
    assert "pip install --upgrade flash-attn-4 nvidia-cutlass-dsl apache-tvm-ffi   # fa4" in fx


def test_selection_reasons_containing_a_semicolon_survive_the_round_trip():
    """A reason may itself hold ``"; "`` (or ``"; name: "``, or a backslash); the line the sink
    writes and the parser reads must agree on where one backend's reasons end."""
    refused = {"fa4": ["needs head_dim <= 256; got 512", "see: a; triton: b"],
               "triton": [r"cache at C:\tmp\; unwritable"]}
    log = _selection_line("flex", refused)  # a (backend, device) no other test prints: the sink prints each once
    rec = parse_log(log.encode(), "x").first("selection")
    assert rec.fields["refused"] == {n: ", ".join(r) for n, r in refused.items()}


def test_selection_lines_from_older_logs_still_split_per_backend():
    """Logs written before reasons were escaped: ``"; "`` splits only before ``name: ``."""
    log = ("[LVSA] backend=reference (auto on cuda) refused: flashinfer: needs X; got Y, "
           "allowed: 64, 128; triton: lvsa-cuda is not installed (pip install lvsa-cuda)\n")
    assert parse_log(log.encode(), "x").first("selection").fields["refused"] == {
        "flashinfer": "needs X; got Y, allowed: 64, 128",
        "triton": "lvsa-cuda is not installed (pip install lvsa-cuda)"}


def test_doctor_install_fixes_are_per_backend(monkeypatch):
    """Every fast backend refused on a GPU: each missing one gets its own install command."""
    why = _fa4_reason(monkeypatch, missing=True)
    log = _selection_line("reference", {
        "fa4": why, "flashinfer": ["package 'flashinfer' is not installed (pip install lvsa-cuda[flashinfer])"]})
    d = diagnose_text(log.encode(), "fa4-missing")
    assert [f.id for f in d.problems] == ["slow-backend"]
    fx = _fix(d, "slow-backend")
    assert "pip install 'lvsa-cuda[fa4]'   # fa4" in fx and "pip install 'lvsa-cuda[flashinfer]'   # flashinfer" in fx


def test_doctor_env_reports_a_broken_backend(monkeypatch):
    from lvsa.doctor.envcheck import check_installation

    broken = _fa4_reason(monkeypatch, "OSError: libcute_dsl_runtime.so: cannot open shared object file")
    info = {"problem": "cuda bfloat16 B=1 T=81", "auto_selects": "flashinfer", "backends": [
        {"name": "fa4", "reasons": broken}, {"name": "flashinfer", "reasons": []},
        {"name": "triton", "reasons": []}]}
    found = {f.id: f for f in check_installation({}, [], info)}
    f = found["backend-broken"]
    assert f.severity == "problem" and "selects flashinfer now" in f.cause
    assert "libcute_dsl_runtime.so" in f.evidence[0][1]
    assert "python -c 'import flash_attn.cute'" in "\n".join(f.fix)
    assert "slow-backend" not in found
    # not installed is no problem while another fast backend runs: a note, like every refusal
    info["backends"][0]["reasons"] = _fa4_reason(monkeypatch, missing=True)
    found = {f.id: f for f in check_installation({}, [], info)}
    assert "backend-broken" not in found and found["backends-unavailable"].severity == "note"


# ------------------------------------------------ the vllm-omni version decides the Wan advice
_FB = " -- falling back to DENSE attention (set LVSA_WARN_FALLBACK=0 to silence)"
_WAN_VLLM = ("$ {env}vllm serve Wan-AI/Wan2.1-T2V-14B-Diffusers --omni --ulysses-degree 2 "
             "--diffusion-attention-config '{{\"per_role\":{{\"self\":{{\"backend\":\"LVSA\"}}}}}}'\n"
             "{version}"
             "INFO 11-30 04:00:40 [selector.py:88] Using diffusion attention backend 'LVSA'\n"
             "INFO 11-30 04:01:17 [api_server.py:410] POST /v1/videos/generations num_frames=129\n"
             "[LVSA-FALLBACK] origin=forward_cuda reason={reason} seq_len=25740{detail}" + _FB + "\n")


def _wan_vllm(version="", reason="geometry_detect", detail=" known_ppf=[1560]", env="", installed=None):
    from lvsa.doctor import diagnose, parse_log

    text = _WAN_VLLM.format(version=version, reason=reason, detail=detail, env=env)
    return diagnose(parse_log(text.encode()), installed_vllm_omni=lambda: installed)


@pytest.mark.parametrize("version", [
    "WARNING  --> vLLM-Omni version 0.22.0\n",             # vllm-omni's own version check
    "$ pip install vllm-omni==0.22.1\n",
    "Name: vllm-omni\nVersion: 0.22.0\n",                   # pip show
    "INFO 11-30 03:58:11 [api_server.py:1032] vLLM API server version 0.22.0\n",  # vLLM's: same minor
])
def test_wan_advice_before_vllm_omni_030_is_the_guides_hook(version):
    d = _wan_vllm(version)
    (f,) = d.problems
    assert f.id == "wan-hook-missing" and f.fix[0] == "export LVSA_WAN_HOOK=1"
    assert "vllm-omni 0.22" in f.cause and "published plugin" in f.cause
    assert any("0.22" in t for _, t in f.evidence)  # the line that names the version is evidence
    assert "pip show vllm-omni lvsa-vllm-omni" not in f.fix


@pytest.mark.parametrize("version, installed", [
    ("WARNING  --> vLLM-Omni version 0.30.0\n", None),
    ("vllm-omni                     0.30.0\n", None),       # pip list
    ("", "0.30.0"),                                          # not in the log: this environment's
])
@pytest.mark.parametrize("env", ["", "LVSA_WAN_HOOK=1 "])
def test_wan_advice_with_vllm_omni_030_is_video_layout_not_the_hook(version, installed, env):
    d = _wan_vllm(version, reason="no_geometry", detail=" why=video_spans=0", env=env, installed=installed)
    (f,) = d.problems
    assert f.id == "wan-video-layout" and "video_layout" in f.cause and "vllm-omni 0.30.0" in f.cause
    assert "LVSA_WAN_HOOK belongs to the published vllm-omni 0.22 plugin" in f.cause
    assert not any(c.startswith("export LVSA_WAN_HOOK") for c in f.fix)
    assert "pip install 'vllm-omni>=0.30,<0.31'" in f.fix
    assert ("unset LVSA_WAN_HOOK   # not read by lvsa-vllm-omni (harmless)" in f.fix) == bool(env)
    assert ("installed in this environment" in f.cause) == (installed is not None)


def test_wan_advice_without_a_version_gives_both_cases():
    (f,) = _wan_vllm().problems
    assert f.id == "wan-hook-missing" and f.fix[0] == "export LVSA_WAN_HOOK=1"
    assert "version is not in the log" in f.cause and "lvsa-vllm-omni (vllm-omni 0.30)" in f.cause
    assert "pip show vllm-omni lvsa-vllm-omni" in f.fix


def test_the_plugins_refusal_names_the_version():
    refused = ("[LVSA-FALLBACK] origin=lvsa_vllm_omni.register reason=vllm_omni_version seq_len=- "
               "found=0.22.1 supported=>=0.30,<0.31" + _FB + "\n")
    d = _wan_vllm(refused)
    assert "wan-hook-missing" in [f.id for f in d.problems]
    assert "export LVSA_WAN_HOOK=1" in _fix(d, "wan-hook-missing") and "vllm-omni 0.22.1" in \
        next(f for f in d.problems if f.id == "wan-hook-missing").cause


@pytest.mark.parametrize("version, hook", [("0.22.0", True), ("0.30.0", False), (None, True)])
def test_backend_not_selected_wan_advice_follows_the_version(version, hook):
    from lvsa.doctor import diagnose, parse_log

    text = ("$ vllm serve Wan-AI/Wan2.1-T2V-1.3B-Diffusers --omni\n"
            + (f" --> vLLM-Omni version {version}\n" if version else "")
            + "INFO 11-30 02:11:31 [selector.py:66] Defaulting to diffusion attention backend FLASH_ATTN\n")
    d = diagnose(parse_log(text.encode()), installed_vllm_omni=lambda: None)
    fx = _fix(d, "vllm-backend-not-selected")
    assert ("export LVSA_WAN_HOOK=1" in fx) == hook
    assert ("vllm-omni 0.22 plugin" in fx) == (version is None)  # unknown: the hook is said to be 0.22's


def test_version_lines_are_parsed_and_foreign_ones_ignored():
    from lvsa.doctor.versions import vllm_omni_version

    text = ("lvsa-vllm-omni           0.1.0\nlvsa_vllm_omni==0.1.0\n"
            "pip install 'vllm-omni>=0.30,<0.31'\nINFO vLLM API server version 0.11.0\n")
    v = vllm_omni_version(parse_log(text.encode()), lambda: None)
    assert (v.version, v.reads_video_layout) == ("0.11.0", False) and "vLLM 0.11.0" in v.where
    v = vllm_omni_version(parse_log((text + "vllm_omni-0.30.1-py3-none-any.whl\n").encode()), lambda: None)
    assert (v.version, v.reads_video_layout, v.where) == ("0.30.1", True, "the log")
    assert vllm_omni_version(parse_log(b"INFO 11-30 [x.py:1] vllm serve M --omni\n"), lambda: None).version is None


def test_the_doctor_knows_the_plugins_vllm_omni():
    import lvsa_vllm_omni
    from lvsa.doctor.versions import PLUGIN_VLLM_OMNI

    assert PLUGIN_VLLM_OMNI == lvsa_vllm_omni._SUPPORTED_MINOR
    assert lvsa_vllm_omni.SUPPORTED == ">=%d.%d,<%d.%d" % (*PLUGIN_VLLM_OMNI, PLUGIN_VLLM_OMNI[0],
                                                            PLUGIN_VLLM_OMNI[1] + 1)


@pytest.mark.parametrize("installed, env, ids, fix", [
    ("0.30.0", {"LVSA_WAN_HOOK": "1"}, ["wan-hook-unused"], "unset LVSA_WAN_HOOK"),
    ("0.30.0", {}, [], None),
    ("0.22.1", {}, ["vllm-omni-before-plugin"], "export LVSA_WAN_HOOK=1"),
    ("0.22.1", {"LVSA_WAN_HOOK": "1"}, ["vllm-omni-before-plugin"], "pip install 'vllm-omni>=0.30,<0.31'"),
    (None, {"LVSA_WAN_HOOK": "1"}, [], None),
])
def test_env_wan_hook_advice_follows_the_installed_vllm_omni(installed, env, ids, fix):
    from lvsa.commands.info import gather_info

    d = check_environment(env=env, info=gather_info(), installed_vllm_omni=lambda: installed)
    found = [f for f in d.findings if f.id in ("wan-hook-unused", "vllm-omni-before-plugin")]
    assert [f.id for f in found] == ids and all(f.severity == "note" for f in found)
    if fix:
        assert any(c.startswith(fix) for c in found[0].fix)
    if installed == "0.22.1" and env:  # already set: only the upgrade is offered
        assert not any(c.startswith("export LVSA_WAN_HOOK") for c in found[0].fix)
