"""``lvsa compare`` on the tiny offline Wan pipeline: dense vs lvsa vs lvsa+RIFLEx, the
side-by-side mp4, per-frame PSNR/SSIM (torchmetrics) of videos and latents, the PNG plot
and the JSON summary; the metric helper against the textbook definitions; bad input."""
import json
import math
import os

import numpy as np
import pytest
import torch

import imageio

from lvsa.cli import main
from lvsa.commands import compare


@pytest.fixture
def cwd(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_compare_tiny_wan_dense_lvsa_riflex(cwd, capsys, monkeypatch):
    # the tiny model's automatic RIFLEx component (period 628) already spans the clip; component 1
    # (period 6.3) is one RIFLEx really lowers, chosen through the variable
    monkeypatch.setenv("LVSA_RIFLEX_K", "1")
    rc = main(["compare", "--height", "32", "--width", "32", "--steps", "2", "--riflex", "--output-dir", "cmp"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    d = cwd / "cmp"
    assert sorted(os.listdir(d)) == ["compare.mp4", "latents.pt", "metrics.png", "summary.json"]
    assert "random weights" in err and "[LVSA] riflex k=1 period 6.3->27.8" in err

    # side by side: dense | lvsa | lvsa+riflex | diff, under a 12-pixel label band
    frames = np.stack(list(imageio.v3.imiter(d / "compare.mp4")))
    assert frames.shape == (97, 32 + 12, 4 * 32, 3)
    png = imageio.v3.imread(d / "metrics.png")
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 500

    s = json.loads((d / "summary.json").read_text())
    assert s["format"] == "lvsa-compare/1" and s["tiny_random_weights"] is True
    assert s["latent_frames"] == 25 and s["reference_latent_frames"] == 21 and s["reference_video_frame"] == 81
    assert list(s["runs"]) == ["dense", "lvsa", "lvsa+riflex"]
    assert s["runs"]["dense"]["lvsa"] is None
    assert s["runs"]["lvsa"]["lvsa"]["sparse_calls"] > 0 and s["runs"]["lvsa"]["riflex"] is None
    rx = s["runs"]["lvsa+riflex"]["riflex"]
    assert rx["k"] == 1 and rx["changed"] and rx["new_period"] == pytest.approx(25 / 0.9)
    for name in ("lvsa", "lvsa+riflex"):
        m = s["metrics_vs_dense"][name]
        assert len(m["video"]["psnr"]) == len(m["video"]["ssim"]) == 97
        assert len(m["latent"]["psnr"]) == len(m["latent"]["ssim"]) == 25
        for part in ("video", "latent"):
            psnr = [v for v in m[part]["psnr"] if v is not None]
            assert psnr and all(0 < v < 200 for v in psnr)
            assert all(-1 <= v <= 1 for v in m[part]["ssim"])
            assert m[part]["psnr_stats"]["min"] == min(psnr)
        # sparse attention changes the video: some frame is measurably different from dense
        assert m["video"]["psnr_stats"]["min"] < 60 and m["video"]["ssim_stats"]["min"] < 1
    # RIFLEx on top changes the latent further than the sparse attention alone
    assert (s["metrics_vs_dense"]["lvsa+riflex"]["latent"]["psnr_stats"]["mean"]
            < s["metrics_vs_dense"]["lvsa"]["latent"]["psnr_stats"]["mean"])
    saved = torch.load(d / "latents.pt", weights_only=True)
    assert list(saved["latents"]) == ["dense", "lvsa", "lvsa+riflex"]
    assert list(saved["latents"]["dense"].shape) == [1, 16, 25, 4, 4]
    assert not torch.equal(saved["latents"]["lvsa"], saved["latents"]["dense"])
    assert f"summary: {d / 'summary.json'}" in out and "lvsa+riflex  vs dense: video PSNR mean" in out


def test_frame_metrics_match_the_definitions():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(5, 3, 24, 24, generator=g)
    a = (b + 0.05 * torch.randn(5, 3, 24, 24, generator=g)).clamp(0, 1)
    a[2] = b[2]                                            # one identical frame
    m = compare.frame_metrics(a, b, data_range=1.0, chunk=2)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    for i in (0, 1, 3, 4):
        assert m["psnr"][i] == pytest.approx(10 * math.log10(1.0 / mse[i].item()), rel=1e-5)
        assert 0 < m["ssim"][i] < 1
    assert m["psnr"][2] is None and m["ssim"][2] == pytest.approx(1.0)
    assert compare._stats(m["psnr"])["identical_frames"] == 1
    # latents smaller than the 11x11 SSIM window get a smaller (odd) window
    small = compare.frame_metrics(a[:, :, :4, :4], b[:, :, :4, :4], data_range=1.0)
    assert small["ssim_kernel"] == 3 and len(small["ssim"]) == 5


def test_missing_extra_is_one_message(cwd, capsys, monkeypatch):
    real = compare.importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real(name, *a))
    assert main(["compare", "--output-dir", "cmp"]) == 2
    assert "needs torchmetrics: pip install 'lvsa[compare]'" in capsys.readouterr().err
    assert not (cwd / "cmp").exists()


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "96"], "does not fit the VAE temporal grid"),
    (["--model", "tiny-nope"], "unknown tiny model"),
    (["--sparsity-scale", "0"], "sparsity_scale"),
])
def test_bad_input_one_message_nothing_written(cwd, capsys, argv, message):
    assert main(["compare", *argv, "--output-dir", "cmp"]) == 2
    assert message in capsys.readouterr().err
    assert not (cwd / "cmp").exists()


def test_a_failing_decode_keeps_every_denoised_latent(cwd, capsys, monkeypatch):
    from lvsa.integrations import wan

    def boom(self, pipe, latents, num_frames=None):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(wan.WanAdapter, "decode", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["compare", "--height", "32", "--width", "32", "--steps", "1", "--num-frames", "9",
              "--output-dir", "cmp"])
    err = capsys.readouterr().err
    assert f"latents of every run are kept in {cwd / 'cmp' / 'latents.pt'}" in err
    saved = torch.load(cwd / "cmp" / "latents.pt", weights_only=True)
    assert list(saved["latents"]) == ["dense", "lvsa"] and saved["num_frames"] == 9
    assert sorted(os.listdir(cwd / "cmp")) == ["latents.pt"]
