"""The lvsa command: plan, info, help texts."""
import json
import subprocess
import sys

import pytest

from lvsa.cli import build_parser, main


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_wan_4x_horizon(capsys):
    rc, out, _ = run(["plan", "--model", "wan2.1-t2v-1.3b", "--num-frames", "333"], capsys)
    assert rc == 0
    assert "[LVSA] reference_latent_frames=21 target_latent_frames=84 extension_ratio=4.00x" in out
    assert "computed key_frame_interval=6" in out and "-> SPARSE" in out
    assert "step 1: offset 1 globals [0, 1, 7," in out
    picture = [ln for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit() and len(ln.split()) == 3]
    assert len(picture) == 84 and all(len(ln.split()[1]) == 84 for ln in picture)


def test_plan_json_matches_planner(capsys):
    rc, out, _ = run(["plan", "--model", "hunyuanvideo-1.5", "--num-frames", "193", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["T"] == 49 and d["reference"] == 33 and d["key_frame_interval"] == 2
    assert d["P"] == 1560 and d["text_tokens"] == 256 and d["seq_len"] == 49 * 1560 + 256
    assert len(d["offsets"]) == 2 and round(d["offsets"][0]["sparsity"], 3) == 0.347
    assert d["rotation"][1]["offset"] == 1


def test_plan_explicit_geometry_and_flags(capsys):
    # --key-frame-interval is in video frames like the window: 32 // 4 = 8 latent
    rc, out, _ = run(["plan", "--latent-frames", "40", "--patches-per-frame", "99", "--key-frame-interval", "32",
                      "--no-rotate", "--window-size", "0", "--json"], capsys)
    d = json.loads(out)
    assert d["key_frame_interval"] == 8 and not d["auto"] and not d["rotate"] and d["W"] == 0
    assert d["offsets"][0]["windows"] is None and d["P"] == 99


def test_plan_reports_bad_input(capsys):
    rc, _, err = run(["plan", "--num-frames", "82"], capsys)
    assert rc == 2 and "does not fit the VAE temporal grid" in err
    rc, _, err = run(["plan", "--model", "nope"], capsys)
    assert rc == 2 and "unknown model preset" in err
    for bad in (["--patches-per-frame", "-5"], ["--text-tokens", "-9"], ["--step", "-3"], ["--steps", "-1"]):
        rc, _, err = run(["plan"] + bad, capsys)
        assert rc == 2 and f"{bad[0]} must be >=" in err


def test_plan_respects_env(capsys, monkeypatch):
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "2.0")
    rc, out, _ = run(["plan", "--num-frames", "161", "--json"], capsys)
    assert json.loads(out)["dense"] is True
    monkeypatch.setenv("LVSA_SPARSITY_SCALE", "zero")
    rc, _, err = run(["plan"], capsys)
    assert rc == 2 and "LVSA_SPARSITY_SCALE='zero'" in err


def test_info_json(capsys, monkeypatch):
    monkeypatch.setenv("LVSA_WINDOW_SIZE", "16")
    rc, out, _ = run(["info", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["lvsa"] and any(x.startswith("cpu") for x in d["devices"])
    names = {b["name"]: b for b in d["backends"]}
    assert names["reference"]["available"] and names["reference"]["distribution"] == "lvsa"
    for n in ("triton", "flashinfer", "ascend"):
        assert n in names and not names[n]["available"] and names[n]["reasons"]
    assert d["auto_selects"] == "reference"
    assert d["settings"]["LVSA_WINDOW_SIZE"] == "16"
    assert d["npu"]["available"] is False and d["npu"]["reason"]


def test_info_text(capsys):
    rc, out, _ = run(["info", "--presets", "--vars"], capsys)
    assert rc == 0 and "auto selects: reference" in out and "LVSA_MASK_LOG" in out and "wan2.2-ti2v-5b" in out


@pytest.mark.parametrize("cmd", ["plan", "info", "generate", "decode", "bench"])
def test_every_subcommand_has_help(cmd):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert cmd in sub.choices
    text = sub.choices[cmd].format_help()
    assert "usage: lvsa " + cmd in text and len(text) > 200


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "lvsa", "plan", "--num-frames", "81", "--no-picture"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "DENSE (T_lat <= ref)" in r.stdout


_BLOCK_DIFFUSERS = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "diffusers":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from lvsa.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["generate", "--output", "x.mp4"], ["generate"], ["decode", "x.pt"]])
def test_missing_diffusers_extra_says_how_to_install(argv, tmp_path):
    """Without diffusers, generate/decode (with any options) explain the extra; others still work."""
    r = subprocess.run([sys.executable, "-c", _BLOCK_DIFFUSERS, *argv], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "needs the diffusers extra" in r.stderr and "pip install 'lvsa[diffusers]'" in r.stderr
    assert "unrecognized arguments" not in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
    ok = subprocess.run([sys.executable, "-c", _BLOCK_DIFFUSERS, "plan", "--no-picture"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("argv, words", [
    (["plan", "--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    (["plan", "--num-frames", "-3"], "--num-frames must be >= 1, got -3"),
])
def test_plan_rejects_impossible_geometry(capsys, argv, words):
    rc, out, err = run(argv, capsys)
    assert rc == 2 and words in err and out == ""


@pytest.mark.parametrize("argv, flag", [
    (["info", "--head-dim", "0"], "--head-dim"),
    (["info", "--head-dim", "-64"], "--head-dim"),
    (["generate", "--seed", str(2 ** 64)], "--seed"),
    (["generate", "--seed", "-1"], "--seed"),
])
def test_out_of_range_flags_are_usage_errors(capsys, argv, flag):
    """`--seed` beyond torch's 64-bit range fails before anything loads (it used to fail after
    loading with 'Overflow when unpacking long long'); `info --head-dim 0` is no problem size."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: expected" in err


def test_largest_seed_is_accepted():
    from lvsa.commands._args import MAX_SEED, seed_int

    assert seed_int(str(MAX_SEED)) == MAX_SEED
    import torch
    torch.Generator("cpu").manual_seed(MAX_SEED)  # the bound is torch's own
