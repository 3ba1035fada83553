"""ci/bootstrap.sh: where torch comes from (issue 18, "Also"), and that it says what it does.

`--torch-plan` prints the torch install the script would run and installs nothing; the
three machines are simulated with pip's own environment variables and a stand-in
`nvidia-smi` on PATH.
"""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(env_extra, path_prefix=None):
    env = dict(os.environ, **env_extra)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    r = subprocess.run(["bash", os.path.join(ROOT, "ci", "bootstrap.sh"), "--torch-plan"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture
def no_local_wheels(tmp_path):
    (tmp_path / "empty").mkdir()
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path / "empty")}


@pytest.fixture
def fake_gpu(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    smi = d / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-00000000)"\n')
    smi.chmod(0o755)
    return str(d)


def test_without_local_wheels_or_gpu_torch_is_the_cpu_build(no_local_wheels, tmp_path):
    empty_path = tmp_path / "nobin"
    empty_path.mkdir()  # no nvidia-smi reachable: PATH with only the basic tools
    env = dict(no_local_wheels, PATH=f"{empty_path}:/usr/bin:/bin")
    args, where = _plan(env)
    assert args == "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
    assert "CPU build" in where
    args, _ = _plan(dict(env, LVSA_TORCH_INDEX_URL="https://mirror.example/cpu"))
    assert args == "--index-url https://mirror.example/cpu torch==2.13.0"


def test_with_a_gpu_torch_is_the_default_build(no_local_wheels, fake_gpu):
    args, where = _plan(no_local_wheels, path_prefix=fake_gpu)
    assert args == "torch==2.13.0" and "GPU is visible" in where


def test_a_local_wheel_wins(tmp_path, fake_gpu):
    # a find-links folder holding a torch 2.13.0 wheel: pip installs it (a real, empty-bodied
    # wheel is enough for pip's dry-run resolution)
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name = "torch-2.13.0+cpu-py3-none-any.whl"
    with zipfile.ZipFile(wheels / name, "w") as z:
        z.writestr("torch/__init__.py", "")
        z.writestr("torch-2.13.0+cpu.dist-info/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        z.writestr("torch-2.13.0+cpu.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("torch-2.13.0+cpu.dist-info/RECORD", "")
    args, where = _plan({"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(wheels)}, path_prefix=fake_gpu)
    assert args == "torch==2.13.0" and "local wheel" in where


def test_says_what_it_does():
    r = subprocess.run(["bash", os.path.join(ROOT, "ci", "bootstrap.sh")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("ci/bootstrap.sh: ")]
    assert said, r.stderr  # up to date, or each install step named
    assert any("up to date" in ln or "installing" in ln for ln in said)
