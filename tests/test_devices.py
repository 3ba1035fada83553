"""Device probing: CUDA inventory through nvidia-smi when NVML is missing; never raises."""
import os
import stat
import sys

import torch

from lvsa import devices


def _fake_tool(tmp_path, name, script):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def test_nvidia_smi_fallback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML not importable
    _fake_tool(tmp_path, "nvidia-smi", "echo '0, NVIDIA H200, 580.159.03, 1024, 143771'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    inv = devices.nvidia_inventory()
    assert inv["source"] == "nvidia-smi" and inv["driver"] == "580.159.03"
    assert inv["gpus"] == [{"index": 0, "name": "NVIDIA H200", "memory_used_mib": 1024,
                            "memory_total_mib": 143771}]


def test_nvidia_smi_failure_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    _fake_tool(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    inv = devices.nvidia_inventory()
    assert inv["source"] is None and "exited 9" in inv["reason"] and "NVIDIA-SMI has failed" in inv["reason"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "nvidia-smi not found" in devices.nvidia_inventory()["reason"]


def test_cpu_machine_defaults():
    assert devices.default_device_kind() in ("cuda", "npu", "cpu")
    if not torch.cuda.is_available():
        assert devices.memory_stats("cpu") is None
        assert devices.all_devices()[-1].kind == "cpu"
    assert devices.collective_backend("npu") == "hccl" and devices.collective_backend("cuda") == "nccl"
