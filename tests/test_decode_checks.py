"""Issue 18 items 8-9: `lvsa decode` checks a latent against its metadata and the model's VAE
before decoding, and its messages say what is wrong (never torch's weights_only=False advice)."""
import os
import shutil

import pytest
import torch

from lvsa import tiny
from lvsa.cli import main

SMALL = ["--height", "32", "--width", "32", "--steps", "2", "--num-frames", "17"]


@pytest.fixture
def cwd(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def latent(cwd, capsys):
    assert main(["generate", *SMALL, "--output-latent", "good.pt"]) == 0
    capsys.readouterr()
    return cwd / "good.pt"


def _decode_error(capsys, *argv):
    """Run lvsa decode expecting exit 2 and one error line; that line. Nothing may be written."""
    before = sorted(os.listdir("."))
    assert main(["decode", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lvsa decode: error: "), err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert sorted(os.listdir(".")) == before
    return lines[0]


def _edit(src, dst, **changes):
    data = torch.load(src, weights_only=True)
    for k, v in changes.items():
        if k.startswith("meta_"):
            data["metadata"][k[5:]] = v
        else:
            data[k] = v
    torch.save(data, dst)
    return dst


def test_nan_latent(latent, capsys):
    data = torch.load(latent, weights_only=True)
    bad = data["latent"].clone()
    bad[0, 0, 0, 0, :2] = float("nan")
    _edit(latent, "nan.pt", latent=bad)
    line = _decode_error(capsys, "nan.pt")
    assert "2 NaN/Inf values" in line and "black video" in line


def test_shape_contradicting_metadata(latent, capsys):
    data = torch.load(latent, weights_only=True)
    _edit(latent, "short.pt", latent=data["latent"][:, :, :3].clone())
    assert "its metadata records latent_shape [1, 16, 5, 4, 4]" in _decode_error(capsys, "short.pt")
    _edit(latent, "frames.pt", num_frames=33)
    assert "num_frames 33 disagrees" in _decode_error(capsys, "frames.pt")
    # shape and metadata edited together: caught against the model's VAE
    _edit(latent, "both.pt", latent=data["latent"][:, :, :3].clone(), meta_latent_shape=[1, 16, 3, 4, 4])
    assert "3 latent frames but num_frames 17 needs 5" in _decode_error(capsys, "both.pt")
    _edit(latent, "size.pt", meta_height=64)
    assert "height 64 needs 8" in _decode_error(capsys, "size.pt")


def test_48_channel_latent_is_refused_before_the_vae(latent, capsys):
    lat48 = torch.randn(1, 48, 5, 4, 4)
    _edit(latent, "wan22.pt", latent=lat48, meta_latent_shape=[1, 48, 5, 4, 4])
    line = _decode_error(capsys, "wan22.pt")
    assert "48 channels but the VAE of tiny-wan takes 16" in line and "--model DIR" in line
    assert "lvsa decode " not in line.split("error: ", 1)[1]  # never advises the same failing command


def test_truncated_latent(latent, capsys):
    raw = latent.read_bytes()
    open("cut.pt", "wb").write(raw[: len(raw) // 2])
    line = _decode_error(capsys, "cut.pt")
    assert "incomplete" in line and "cut short" in line and "not a latent written" not in line


def test_random_bytes_and_foreign_objects(latent, capsys):
    open("noise.pt", "wb").write(os.urandom(4096))
    assert "not a torch file" in _decode_error(capsys, "noise.pt")
    torch.save({"latent": torch.zeros(1), "metadata": {"format": "lvsa-latent/1"}, "x": os.path.join},
               "code.pt")  # a pickled function: refused by weights_only=True
    line = _decode_error(capsys, "code.pt")
    assert "weights_only=True" in line and "could run code" in line


def test_edited_metadata_without_a_model(latent, capsys):
    _edit(latent, "nomodel.pt", meta_model=None)
    line = _decode_error(capsys, "nomodel.pt")
    assert "metadata names no model" in line and "--model DIR" in line and "--model None" not in line
    # with --model it decodes
    assert main(["decode", "nomodel.pt", "--model", "tiny-wan"]) == 0


def test_a_moved_model_is_named_as_recorded(cwd, capsys):
    tiny.build("cogvideox").save_pretrained(cwd / "cog")
    assert main(["generate", "--model", "cog", *SMALL, "--output-latent", "c.pt"]) == 0
    capsys.readouterr()
    shutil.move(cwd / "cog", cwd / "moved")
    line = _decode_error(capsys, "c.pt")
    assert f"the model recorded in {cwd / 'c.pt'}: {cwd / 'cog'}: no such directory" in line
    assert "pass its directory with --model DIR" in line and "error: --model" not in line
    assert main(["decode", "c.pt", "--model", "moved"]) == 0
    assert f"output:    {cwd / 'c.mp4'}" in capsys.readouterr().out
    line = _decode_error(capsys, "c.pt", "--model", "tiny-wan")
    assert "--model tiny-wan is a wan model; this latent's metadata says it is a 'cogvideox' latent" in line
