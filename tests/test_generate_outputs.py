"""Issue 18 items 1-3: `lvsa generate`/`decode` never lose or mix up work.

Staging files have names no user owns, an existing file is never replaced without
--overwrite, concurrent runs do not share staging files, and Ctrl-C anywhere prints one
line (what was kept, what was removed) and exits 130. Real runs of the tiny offline model.
"""
import os
import signal
import subprocess
import sys
import time

import imageio
import numpy as np
import pytest
import torch

from lvsa.cli import main
from lvsa.outputs import numbered

SMALL = ["--height", "32", "--width", "32", "--steps", "2", "--num-frames", "17"]


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _frames(path):
    return np.stack(list(imageio.v3.imiter(path)))


@pytest.fixture
def cwd(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_numbered_names():
    assert numbered("/o/fox.mp4", 2) == "/o/fox-2.mp4"
    assert numbered("/o/fox.latent.pt", 1) == "/o/fox-1.latent.pt"
    assert numbered("/o/lat.pt", 3) == "/o/lat-3.pt"


def test_a_users_latent_next_to_the_video_is_left_alone(cwd, capsys):
    """Item 1: the safety latent used to be staged at outputs/fox.latent.pt and deleted."""
    (cwd / "outputs").mkdir()
    mine = cwd / "outputs" / "fox.latent.pt"
    mine.write_bytes(b"my earlier latent")
    assert main(["generate", *SMALL, "--output", "outputs/fox.mp4"]) == 0
    assert mine.read_bytes() == b"my earlier latent"
    assert _tree(cwd) == ["outputs/fox.latent.pt", "outputs/fox.mp4"]  # no staging file left behind


def test_existing_outputs_get_a_numbered_name_unless_overwrite(cwd, capsys):
    (cwd / "v.mp4").write_bytes(b"my video")
    (cwd / "lat.pt").write_bytes(b"my latent")
    assert main(["generate", *SMALL, "--output", "v.mp4", "--output-latent", "lat.pt"]) == 0
    out = capsys.readouterr()
    assert (cwd / "v.mp4").read_bytes() == b"my video" and (cwd / "lat.pt").read_bytes() == b"my latent"
    assert f"{cwd / 'v.mp4'} already exists; wrote {cwd / 'v-1.mp4'} instead (--overwrite replaces it)" in out.err
    assert f"{cwd / 'lat.pt'} already exists; wrote {cwd / 'lat-1.pt'} instead" in out.err
    assert f"output:    {cwd / 'v-1.mp4'}" in out.out and f"latent:    {cwd / 'lat-1.pt'}" in out.out
    assert _frames(cwd / "v-1.mp4").shape == (17, 32, 32, 3)
    assert torch.load(cwd / "lat-1.pt", weights_only=True)["num_frames"] == 17

    assert main(["generate", *SMALL, "--output", "v.mp4", "--overwrite"]) == 0
    out = capsys.readouterr()
    assert "already exists" not in out.err and f"output:    {cwd / 'v.mp4'}" in out.out
    assert _frames(cwd / "v.mp4").shape == (17, 32, 32, 3)
    assert _tree(cwd) == ["lat-1.pt", "lat.pt", "v-1.mp4", "v.mp4"]

    # lvsa decode follows the same rule
    assert main(["decode", "lat-1.pt", "--output", "v.mp4"]) == 0
    assert f"output:    {cwd / 'v-2.mp4'}" in capsys.readouterr().out


def test_decode_out_of_memory_never_replaces_a_users_latent(cwd, capsys, monkeypatch):
    from lvsa.integrations.wan import WanAdapter

    def oom(self, pipe, latents, num_frames=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB")

    (cwd / "v.latent.pt").write_bytes(b"mine")
    monkeypatch.setattr(WanAdapter, "decode", oom)
    assert main(["generate", *SMALL, "--output", "v.mp4"]) == 3
    err = capsys.readouterr().err
    kept = cwd / "v-1.latent.pt"
    assert f"safe at {kept}" in err and f"lvsa decode {kept} --output {cwd / 'v.mp4'}" in err
    assert (cwd / "v.latent.pt").read_bytes() == b"mine"
    assert _tree(cwd) == ["v-1.latent.pt", "v.latent.pt"]


def _spawn(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "lvsa", "generate", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_runs_to_one_output(tmp_path, overwrite):
    """Item 2: two runs with the same --output at once: both succeed, each reports the file
    it wrote, nothing is shared or left behind."""
    args = [*SMALL, "--output", "outputs/same.mp4"] + (["--overwrite"] if overwrite else [])
    procs = [_spawn(args, tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    outs = []
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        line = next(ln for ln in out.splitlines() if ln.startswith("  output:"))
        outs.append(line.split(None, 1)[1])
    files = _tree(tmp_path)
    if overwrite:  # the last rename wins; both reported the one path
        assert outs[0] == outs[1] == str(tmp_path / "outputs" / "same.mp4")
        assert files == ["outputs/same.mp4"]
    else:  # each keeps its own file
        assert sorted(outs) == [str(tmp_path / "outputs" / "same-1.mp4"), str(tmp_path / "outputs" / "same.mp4")]
        assert files == ["outputs/same-1.mp4", "outputs/same.mp4"]
    for f in files:
        assert _frames(tmp_path / f).shape == (17, 32, 32, 3)


def _one_line(err, cmd="generate"):
    lines = [ln for ln in err.splitlines() if ln.startswith(f"lvsa {cmd}: interrupted")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_ctrl_c_during_denoising_real_sigint(tmp_path):
    """Item 3: a real SIGINT in the denoise loop: one line, exit 130, nothing left."""
    p = _spawn(["--height", "32", "--width", "32", "--steps", "400", "--output", "v.mp4"], tmp_path)
    seen = ""
    deadline = time.monotonic() + 240
    while "denoising:" not in seen and time.monotonic() < deadline:
        ch = p.stderr.read(1)
        if not ch:
            break
        seen += ch
    assert "denoising:" in seen, seen[-2000:]
    time.sleep(1.0)  # inside the loop (400 steps take far longer)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    err = seen + err
    assert p.returncode == 130, err[-3000:]
    line = _one_line(err)
    assert "while denoising" in line and "no latent was saved" in line and "nothing else was written" in line
    assert _tree(tmp_path) == []


def test_ctrl_c_in_the_denoise_loop_injected(cwd, capsys, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    calls = []
    real = FlowMatchEulerDiscreteScheduler.step

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", step)
    assert main(["generate", *SMALL, "--steps", "4", "--output", "v.mp4", "--output-latent", "v.pt"]) == 130
    line = _one_line(capsys.readouterr().err)
    assert "while denoising" in line and "no latent was saved" in line
    assert _tree(cwd) == []


@pytest.mark.parametrize("given_latent", [False, True])
def test_ctrl_c_while_the_mp4_is_written(cwd, capsys, monkeypatch, given_latent):
    """Interrupted in the middle of the mp4: the latent is kept (and named, with the decode
    command), the unfinished mp4 removed; then the latent decodes."""
    import imageio_ffmpeg  # noqa: F401 - the writer imageio uses

    from imageio.plugins.ffmpeg import FfmpegFormat

    n = []
    real = FfmpegFormat.Writer._append_data

    def append(self, im, meta):
        n.append(1)
        if len(n) == 5:
            raise KeyboardInterrupt
        return real(self, im, meta)

    monkeypatch.setattr(FfmpegFormat.Writer, "_append_data", append)
    extra = ["--output-latent", "keep/mine.pt"] if given_latent else []
    assert main(["generate", *SMALL, "--output", "out/v.mp4", *extra]) == 130
    line = _one_line(capsys.readouterr().err)
    latent = cwd / ("keep/mine.pt" if given_latent else "out/v.latent.pt")
    assert "while writing the mp4" in line
    assert f"kept the denoised latent at {latent} (finish with: lvsa decode {latent} --output {cwd / 'out' / 'v.mp4'})" in line
    assert "removed the unfinished " in line and ".lvsa-staging.mp4" in line
    assert _tree(cwd) == [os.path.relpath(latent, cwd)]
    monkeypatch.setattr(FfmpegFormat.Writer, "_append_data", real)
    assert main(["decode", str(latent), "--output", "out/v.mp4"]) == 0
    assert _frames(cwd / "out" / "v.mp4").shape == (17, 32, 32, 3)


def test_ctrl_c_during_decode_command(cwd, capsys, monkeypatch):
    from lvsa.integrations.wan import WanAdapter

    assert main(["generate", *SMALL, "--output-latent", "lat.pt"]) == 0
    capsys.readouterr()

    def interrupted(self, pipe, latents, num_frames=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(WanAdapter, "decode", interrupted)
    assert main(["decode", "lat.pt"]) == 130
    line = _one_line(capsys.readouterr().err, "decode")
    assert "while decoding the latent (VAE)" in line and f"the latent {cwd / 'lat.pt'} is untouched" in line
    assert _tree(cwd) == ["lat.pt"]


# ------------------------------------------------------------ item 7: the backend before loading
@pytest.fixture
def no_loading(monkeypatch):
    import lvsa.models

    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded before the backend was checked")

    monkeypatch.setattr(lvsa.models, "load_pipeline", refuse)


@pytest.mark.parametrize("env, argv, words", [
    ({}, ["--backend", "ascend"], ["--backend=ascend", "device is cpu", "npu"]),
    ({}, ["--backend", "triton", "--num-frames", "17"], ["--backend=triton", "cpu"]),
    ({"LVSA_BACKEND": "nonexistent"}, ["--num-frames", "17"],  # a dense run: still an error
     ["LVSA_BACKEND=nonexistent", "unknown backend 'nonexistent'"]),
    ({"LVSA_BACKEND": "ascend"}, [], ["LVSA_BACKEND=ascend", "device is cpu"]),
])
def test_a_named_backend_that_cannot_run_is_found_before_loading(cwd, capsys, monkeypatch, no_loading,
                                                                 env, argv, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["generate", "--height", "32", "--width", "32", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvsa generate: error: "), err
    for w in words:
        assert w in lines[0]
    assert "lvsa_not_called" not in err
    assert _tree(cwd) == []


def test_a_named_backend_that_can_run_still_runs(cwd, capsys, monkeypatch):
    monkeypatch.setenv("LVSA_BACKEND", "reference")
    assert main(["generate", "--height", "32", "--width", "32", "--steps", "2", "--output-latent", "a.pt"]) == 0
    assert "SPARSE backend=reference" in capsys.readouterr().out


def test_ctrl_c_after_the_video_is_written(cwd, capsys, monkeypatch):
    """Interrupted while the summary prints: the line says the video is complete."""
    from lvsa.commands import generate as gen

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "print_summary", interrupted)
    assert main(["generate", *SMALL, "--output", "v.mp4", "--output-latent", "v.pt"]) == 130
    line = _one_line(capsys.readouterr().err)
    assert f"the video {cwd / 'v.mp4'} is complete" in line and "nothing else was written" in line
    assert _tree(cwd) == ["v.mp4", "v.pt"]
