"""Real vllm-omni 0.30 on a CPU: the two stubs it needs, the plugin registered once.

Run in .venv-vllm-omni (``ci/vllm_omni_env.sh``); ``tests/conftest.py`` keeps lvsa's own
run from collecting this directory. Stubs, each for one thing a CPU cannot do:

* ``vllm._C_stable_libtorch``: vllm's CUDA op library; importing it loads libcuda.so.1.
  Nothing here calls its ops (the layers run their torch-native paths on the CPU).
* the CUDA platform's device queries: :class:`CpuCudaOmniPlatform` is vllm-omni's real
  ``CudaOmniPlatform`` (backend resolution and validation, ``forward_cuda`` dispatch)
  answering capability/name/device questions for an H100-class GPU without a driver.

One more import detail, not a stub: ``vllm_omni.diffusion.models.wan2_2``'s package
``__init__`` imports the image-to-video and speech-to-video pipelines, which need a
torchvision whose C ops load CUDA; the package is entered without running it, so its
``wan2_2_transformer`` module imports as it is.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))


def _enter_package_without_init(name: str) -> None:
    if name in sys.modules:
        return
    parent, _, leaf = name.rpartition(".")
    locations = importlib.util.find_spec(parent).submodule_search_locations
    path = [os.path.join(p, leaf) for p in locations]
    mod = types.ModuleType(name)
    mod.__path__ = path
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__spec__.submodule_search_locations = path
    sys.modules[name] = mod


_enter_package_without_init("vllm_omni.diffusion.models.wan2_2")

import torch  # noqa: E402
import vllm_omni.platforms as omni_platforms  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm_omni.platforms.cuda.platform import CudaOmniPlatform  # noqa: E402


class CpuCudaOmniPlatform(CudaOmniPlatform):
    """vllm-omni's CUDA platform with its device queries answered for a driverless CPU."""

    @classmethod
    def get_device_capability(cls, device_id: int = 0):
        return DeviceCapability(major=9, minor=0)

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "NVIDIA H100 (stub: CPU tensors)"

    @classmethod
    def get_torch_device(cls, local_rank=None):
        return torch.device("cpu")

    @classmethod
    def is_available(cls) -> bool:
        return False

    @classmethod
    def get_device_count(cls) -> int:
        return 1  # one (stub) device per process, as on a one-GPU worker

    @classmethod
    def set_device(cls, device) -> None:
        pass  # tensors stay on the CPU


omni_platforms._current_omni_platform = CpuCudaOmniPlatform()

import lvsa_vllm_omni  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def registered():
    assert lvsa_vllm_omni.register() is True
    return True


@pytest.fixture(autouse=True)
def fresh_lvsa(monkeypatch):
    from lvsa import dispatch, plugins, telemetry
    from lvsa_vllm_omni import runtime

    for k in list(os.environ):
        if k.startswith("LVSA_") and k != "LVSA_CHECK":
            monkeypatch.delenv(k)
    plugins.reset()
    dispatch.clear_caches()
    telemetry.reset_session()
    runtime.RUNTIMES.clear()
    yield
    runtime.RUNTIMES.clear()
