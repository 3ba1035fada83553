"""examples/hunyuan_generate.py: the troubleshooting guide's Symptom 2 command works as written."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hunyuan_example_output_latent(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "hunyuan_generate.py"),
           "--num-frames", "69", "--height", "32", "--width", "32", "--steps", "2",
           "--output-dir", "benchmarks", "--output-name", "out_2x",
           "--lvsa", "--rotate-keyframes", "--auto-keyframes", "--output-latent"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = torch.load(tmp_path / "benchmarks" / "out_2x.pt", weights_only=True)
    assert data["num_frames"] == 69 and data["latent"].dim() == 5
    assert "[LVSA] engaged (hunyuan)" in r.stderr


def test_hunyuan_example_passes_overwrite_on():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hunyuan_generate",
                                                  os.path.join(ROOT, "examples", "hunyuan_generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = mod.build_parser()
    assert "--overwrite" in mod.to_generate_argv(p.parse_args(["--overwrite", "--output-latent"]))
    assert "--overwrite" not in mod.to_generate_argv(p.parse_args([]))
