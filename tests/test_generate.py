"""``lvsa generate`` / ``lvsa decode`` on the tiny offline pipelines: the main-job command,
latent round trip, decode out of memory, bad input, container paths, a model directory."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import imageio  # noqa: E402

from lvsa import container, outputs, tiny  # noqa: E402
from lvsa.commands import _video  # noqa: E402
from lvsa.cli import main  # noqa: E402

SMALL = ["--height", "32", "--width", "32", "--steps", "2"]


def _frames(path):
    return np.stack(list(imageio.v3.imiter(path)))


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def cwd(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_main_job_default_command(tmp_path):
    """`lvsa generate` with no arguments: the README's main command, sparse, an mp4, seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "lvsa", "generate"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "outputs" / "lvsa-tiny-wan-97f.mp4"
    assert f"output:    {out}" in r.stdout
    assert "makes NOISE" in r.stderr
    assert "[LVSA] reference_latent_frames=21 target_latent_frames=25 extension_ratio=1.19x" in r.stderr
    assert "[LVSA] engaged (wan): T_lat=25 P=16" in r.stderr and "-> SPARSE" in r.stderr
    assert "denoising: 100%" in r.stderr  # the progress bar
    assert "lvsa:      SPARSE backend=" in r.stdout and "fallbacks=0" in r.stdout
    assert "peak mem:" in r.stdout
    assert f"[export] {out} (" in r.stderr  # the line Symptom 3 of the troubleshooting guide reads
    assert _tree(tmp_path) == ["outputs/lvsa-tiny-wan-97f.mp4"]  # the safety latent is gone
    v = _frames(out)
    assert v.shape == (97, 64, 64, 3)


def test_latent_round_trip_through_decode(cwd, capsys):
    assert main(["generate", *SMALL, "--output-latent", "lat.pt"]) == 0
    assert _tree(cwd) == ["lat.pt"]  # --output-latent alone skips the VAE
    data = torch.load(cwd / "lat.pt", weights_only=True)
    meta = data["metadata"]
    assert data["num_frames"] == meta["num_frames"] == 97
    assert meta["format"] == outputs.LATENT_FORMAT and meta["family"] == "wan" and meta["model"] == "tiny-wan"
    assert list(data["latent"].shape) == [1, 16, 25, 4, 4] and meta["latent_tokens"] == [25, 4]
    assert meta["lvsa"]["sparse_calls"] > 0
    assert f"latent:    {cwd / 'lat.pt'}" in capsys.readouterr().out

    assert main(["decode", "lat.pt"]) == 0
    assert f"output:    {cwd / 'lat.mp4'}" in capsys.readouterr().out
    decoded = _frames(cwd / "lat.mp4")
    assert decoded.shape == (97, 32, 32, 3)

    assert main(["generate", *SMALL, "--output", "direct.mp4"]) == 0  # same seed, decoded in one go
    np.testing.assert_allclose(_frames(cwd / "direct.mp4").astype(int), decoded.astype(int), atol=2)


def test_decode_out_of_memory_keeps_the_latent(cwd, capsys, monkeypatch):
    from lvsa.integrations.wan import WanAdapter

    def oom(self, pipe, latents, num_frames=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(WanAdapter, "decode", oom)
        assert main(["generate", *SMALL, "--output", "out/v.mp4"]) == _video.EXIT_DECODE_OOM
    latent = cwd / "out" / "v.latent.pt"
    err = capsys.readouterr().err
    assert f"safe at {latent}" in err and f"lvsa decode {latent}" in err
    assert _tree(cwd) == ["out/v.latent.pt"]  # no mp4, no temporary files
    assert main(["decode", str(latent), "--output", "out/v.mp4"]) == 0
    assert _frames(cwd / "out" / "v.mp4").shape[0] == 97


def test_no_lvsa_baseline_equals_lvsa_at_or_below_reference(cwd, capsys):
    args = [*SMALL, "--num-frames", "17"]
    assert main(["generate", *args, "--output-latent", "a.pt"]) == 0
    assert "DENSE (T_lat <= reference)" in capsys.readouterr().out
    assert main(["generate", *args, "--no-lvsa", "--output-latent", "b.pt"]) == 0
    assert "lvsa:      off" in capsys.readouterr().out
    a = torch.load(cwd / "a.pt", weights_only=True)["latent"]
    b = torch.load(cwd / "b.pt", weights_only=True)["latent"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such/dir"], "no such directory"),
    (["--model", "."], "not a diffusers pipeline directory (no model_index.json"),
    (["--model", "tiny-sora"], "unknown tiny model"),
    (["--num-frames", "50"], "--num-frames 50: num_frames=50 does not fit the VAE temporal grid: (F-1) must be a multiple of 4; use 49 or 53"),
    (["--height", "40"], "--height 40 is not divisible by 16 (VAE spatial factor 8 x patch size 2)"),
    (["--width", "72"], "--width 72 is not divisible by 16"),
    (["--output", "blocker/x.mp4"], "blocker is a file, not a directory"),
    (["--output", "video.avi"], "must end with .mp4"),
    (["--output-latent", "sub"], "must end with .pt"),
    (["--sparsity-scale", "0"], "sparsity_scale"),
    (["--backend", "no-such-backend"], "unknown backend 'no-such-backend'"),
])
def test_bad_input_one_message_nothing_written(cwd, capsys, argv, message):
    (cwd / "blocker").write_text("a file in the way")
    (cwd / "sub").mkdir()
    before = _tree(cwd)
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lvsa generate: error: ") and message in err[0]
    assert _tree(cwd) == before


def test_decode_rejects_foreign_files(cwd, capsys):
    torch.save({"x": torch.zeros(1)}, cwd / "foreign.pt")
    assert main(["decode", "foreign.pt"]) == 2
    assert "not a latent written by lvsa generate" in capsys.readouterr().err
    assert main(["decode", "missing.pt"]) == 2


def test_model_directory(cwd, capsys):
    # a saved pipeline directory (CogVideoX: diffusers loads it without `accelerate`)
    tiny.build("cogvideox").save_pretrained(cwd / "cogmodel")
    assert main(["generate", "--model", "cogmodel", "--num-frames", "64"]) == 2
    assert "--num-frames 64: num_frames=64 does not fit" in capsys.readouterr().err
    assert main(["generate", "--model", "cogmodel", *SMALL, "--num-frames", "65", "--output", "c.mp4"]) == 0
    out = capsys.readouterr()
    assert "[LVSA] engaged (cogvideox): T_lat=17 P=4" in out.err and "-> SPARSE" in out.err
    assert f"output:    {cwd / 'c.mp4'}" in out.out
    assert _frames(cwd / "c.mp4").shape == (65, 32, 32, 3)


def _fake_root(tmp_path, mountinfo, dockerenv=True):
    root = tmp_path / "root"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    if dockerenv:
        (root / ".dockerenv").write_text("")
    return str(root)


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/docker/l1,upperdir=u,workdir=w
30 27 8:1 /home/me/code /workdir/code rw,relatime - ext4 /dev/sda1 rw
31 27 0:60 / /tmp rw - tmpfs tmpfs rw
"""


def test_container_output_path_check(tmp_path):
    root = _fake_root(tmp_path, MOUNTINFO)
    w = container.container_path_warning("/home/me/out.mp4", "/home/me/out.mp4", root=root)
    assert w and "/.dockerenv" in w and "not on a bind mount" in w
    assert "-w /workdir/code" in w and "--output outputs/out.mp4" in w
    assert container.container_path_warning("/tmp/x.mp4", "/tmp/x.mp4", root=root)  # tmpfs dies with the container
    assert container.container_path_warning("/workdir/code/o/x.mp4", "/workdir/code/o/x.mp4", root=root) is None
    assert container.container_path_warning("o/x.mp4", "/anywhere/o/x.mp4", root=root) is None  # relative: fine
    no_docker = _fake_root(tmp_path / "host", "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n", dockerenv=False)
    assert container.container_path_warning("/home/me/out.mp4", "/home/me/out.mp4", root=no_docker) is None
    overlay_only = _fake_root(tmp_path / "podman", MOUNTINFO, dockerenv=False)
    assert "overlay" in container.container_evidence(overlay_only)


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--num-frames", "--height", "--width", "--steps", "--seed", "--backend",
                 "--sparsity-scale", "--reference-latent-frames", "--no-lvsa", "--output", "--output-latent"):
        assert flag in text
    assert "NOISE" in text
    with pytest.raises(SystemExit):
        main(["decode", "--help"])
    assert "LATENT.pt" in capsys.readouterr().out


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_adapter_decode_matches_the_pipelines_own(family):
    # `lvsa decode` / the decode after the saved latent must equal what the pipeline would have returned
    from lvsa.integrations.registry import adapter_for_family

    pipe = tiny.build(family)
    pipe.set_progress_bar_config(disable=True)
    kw = tiny.call_kwargs(family, num_frames=9, height=32, width=32, num_inference_steps=1)
    with torch.no_grad():
        ref = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames[0]
        latent = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames
        got = adapter_for_family(family).decode(pipe, latent, num_frames=9)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_cogvideox_15_padding_is_dropped_before_decode():
    """CogVideoX 1.5 (patch_size_t=2) pads the latent; the decode must drop it like the pipeline."""
    from lvsa.integrations.registry import adapter_for_family

    pipe = tiny.build("cogvideox", patch_size_t=2)
    pipe.set_progress_bar_config(disable=True)
    kw = tiny.call_kwargs("cogvideox", num_frames=33, height=32, width=32, num_inference_steps=1)
    with torch.no_grad():
        ref = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames[0]
        latent = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **kw).frames
        assert latent.shape[1] == 10  # 33 frames -> 9 latent frames, padded in front to 10
        got = adapter_for_family("cogvideox").decode(pipe, latent, num_frames=33)
    assert got.shape[0] == ref.shape[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_decode_failure_names_the_kept_latent(cwd, capsys, monkeypatch):
    from lvsa.integrations.wan import WanAdapter

    def broken(self, pipe, latents, num_frames=None):
        raise RuntimeError("a VAE bug")

    monkeypatch.setattr(WanAdapter, "decode", broken)
    with pytest.raises(RuntimeError):
        main(["generate", *SMALL, "--output", "out/v.mp4"])
    latent = cwd / "out" / "v.latent.pt"
    assert latent.exists() and _tree(cwd) == ["out/v.latent.pt"]
    err = capsys.readouterr().err
    assert f"the denoised latent is kept at {latent}" in err and f"lvsa decode {latent} --output" in err
