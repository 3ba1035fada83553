"""The one module that knows devices: CUDA, Ascend NPU and CPU.

Everything else asks here. Probing never raises: a broken ``torch_npu`` install
(CANN missing, ``libhccl.so`` not found) is reported as a reason, not a crash.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" | "npu" | "cpu"
    index: Optional[int] = None
    name: str = ""
    compute_capability: Optional[Tuple[int, int]] = None
    total_memory: Optional[int] = None  # bytes

    def describe(self) -> str:
        s = f"{self.kind}:{self.index}" if self.index is not None else self.kind
        if self.name:
            s += f" {self.name}"
        if self.compute_capability:
            s += f" (sm_{self.compute_capability[0]}{self.compute_capability[1]})"
        if self.total_memory:
            s += f" {self.total_memory / 2**30:.1f} GiB"
        return s


@dataclass(frozen=True)
class NpuStatus:
    """What the Ascend probe found. ``available`` only when every step worked."""

    installed: bool
    importable: bool
    available: bool
    device_count: int = 0
    reason: Optional[str] = None
    devices: Tuple[DeviceInfo, ...] = field(default_factory=tuple)


def probe_npu() -> NpuStatus:
    """Probe Ascend: torch_npu found → imported → ``torch.npu.is_available()``."""
    if importlib.util.find_spec("torch_npu") is None:
        return NpuStatus(False, False, False, reason="torch_npu is not installed (pip install torch-npu)")
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # noqa: BLE001 - a broken CANN install raises anything
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return NpuStatus(True, False, False, reason=(
            f"torch_npu is installed but fails to import ({type(e).__name__}: {msg}); "
            "source <CANN>/set_env.sh (CANN toolkit) or set TORCH_DEVICE_BACKEND_AUTOLOAD=0 "
            "if torch itself fails to import"))
    npu = getattr(torch, "npu", None)
    try:
        ok = bool(npu is not None and npu.is_available())
        count = int(npu.device_count()) if ok else 0
    except Exception as e:  # noqa: BLE001
        return NpuStatus(True, True, False, reason=f"torch.npu.is_available() raised {type(e).__name__}: {e}")
    if not ok or count == 0:
        return NpuStatus(True, True, False, reason="torch_npu imports but no NPU is visible "
                         "(check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)")
    devs = []
    for i in range(count):
        name = ""
        total = None
        try:
            name = str(npu.get_device_name(i))
        except Exception:  # noqa: BLE001
            pass
        try:
            total = int(npu.mem_get_info(i)[1])
        except Exception:  # noqa: BLE001
            pass
        devs.append(DeviceInfo("npu", i, name, None, total))
    return NpuStatus(True, True, True, count, None, tuple(devs))


@functools.lru_cache(maxsize=None)
def _npu_status_cached() -> NpuStatus:
    return probe_npu()


def npu_status(refresh: bool = False) -> NpuStatus:
    if refresh:
        _npu_status_cached.cache_clear()
    return _npu_status_cached()


def cuda_devices() -> List[DeviceInfo]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(DeviceInfo("cuda", i, p.name, (p.major, p.minor), int(p.total_memory)))
    return out


def compute_capability(device) -> Optional[Tuple[int, int]]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cc(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cc(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def all_devices() -> List[DeviceInfo]:
    """Every accelerator found, then the CPU."""
    devs = cuda_devices()
    st = npu_status()
    devs.extend(st.devices)
    devs.append(DeviceInfo("cpu", None, "CPU"))
    return devs


def default_device_kind() -> str:
    """The device kind a new run would use: cuda, then npu, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if npu_status().available:
        return "npu"
    return "cpu"


def default_device() -> torch.device:
    kind = default_device_kind()
    return torch.device(kind if kind == "cpu" else f"{kind}:0")


# -------------------------------------------------------------- memory/sync
def _accel_module(kind: str):
    if kind == "cuda":
        return torch.cuda
    if kind == "npu":
        return getattr(torch, "npu", None)
    return None


def synchronize(device) -> None:
    device = torch.device(device)
    mod = _accel_module(device.type)
    if mod is not None:
        mod.synchronize(device)


def memory_stats(device) -> Optional[dict]:
    """Allocator figures in bytes for a CUDA or NPU device (``None`` on CPU)."""
    device = torch.device(device)
    mod = _accel_module(device.type)
    if mod is None:
        return None
    idx = device.index if device.index is not None else mod.current_device()
    return {
        "device_kind": device.type, "index": idx,
        "alloc": int(mod.memory_allocated(idx)),
        "reserved": int(mod.memory_reserved(idx)),
        "peak": int(mod.max_memory_allocated(idx)),
    }


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    mod = _accel_module(device.type)
    if mod is not None:
        mod.reset_peak_memory_stats(device)


def collective_backend(kind: str) -> str:
    """torch.distributed backend for a device kind."""
    return {"cuda": "nccl", "npu": "hccl"}.get(kind, "gloo")


# ------------------------------------------------------- vendor tools (smi)
#: NVML clock-event ("throttle") reason bits, as nvml.h names them
THROTTLE_REASONS = (
    (0x1, "gpu_idle"), (0x2, "applications_clocks_setting"), (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"), (0x10, "sync_boost"), (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"), (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def throttle_names(mask) -> List[str]:
    """Names of the set bits of an NVML clocks-event (throttle) reason mask."""
    try:
        mask = int(str(mask), 0) if not isinstance(mask, int) else mask
    except ValueError:
        return [str(mask)]
    names = [n for bit, n in THROTTLE_REASONS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in THROTTLE_REASONS)
    return names + ([hex(rest)] if rest else [])


def _nvml_gpu(pynvml, i: int, detail: bool) -> dict:
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    name = pynvml.nvmlDeviceGetName(h)
    g = {"index": i, "name": name.decode() if isinstance(name, bytes) else name,
         "memory_used_mib": mem.used // 2**20, "memory_total_mib": mem.total // 2**20}
    if not detail:
        return g
    missing = []

    def read(key, fn, scale=1.0):
        try:
            v = fn()
            g[key] = v * scale if scale != 1.0 else v
        except Exception as e:  # noqa: BLE001 - one unsupported query is a note, not a failure
            missing.append(f"{key} ({type(e).__name__})")

    read("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h), 1e-3)
    read("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h), 1e-3)
    read("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
    read("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
    read("memory_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
    read("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
    read("utilization_pct", lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        getattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons")
    read("throttle_mask", lambda: int(reasons(h)))
    if "throttle_mask" in g:
        g["throttle_reasons"] = throttle_names(g["throttle_mask"])
    if missing:
        g["missing"] = missing
    return g


#: nvidia-smi fields of the detailed query, and the keys they fill
_SMI_DETAIL = (("power.draw", "power_w", float), ("power.limit", "power_limit_w", float),
               ("clocks.sm", "sm_clock_mhz", int), ("clocks.max.sm", "sm_clock_max_mhz", int),
               ("clocks.mem", "memory_clock_mhz", int), ("temperature.gpu", "temperature_c", int),
               ("utilization.gpu", "utilization_pct", int),
               ("clocks_throttle_reasons.active", "throttle_mask", str))


def _smi_value(raw: str, conv):
    raw = raw.strip()
    if raw in ("", "[N/A]", "N/A", "[Not Supported]", "[Unknown Error]"):
        return None
    try:
        return conv(float(raw)) if conv is int else conv(raw)
    except ValueError:
        return None


def nvidia_inventory(detail: bool = False) -> dict:
    """Per-GPU name, driver and memory from NVML (nvidia-ml-py), else ``nvidia-smi``.

    Returns ``{"source": "nvml"|"nvidia-smi", "driver": str, "gpus": [...]}`` or
    ``{"source": None, "reason": "..."}``; never raises. With ``detail`` every GPU also
    carries power (W) and its limit, SM and memory clocks (MHz), temperature, utilization
    and the active throttle reasons (``throttle_mask``, ``throttle_reasons``); a field
    the driver does not answer is listed under ``missing``.
    """
    try:
        import pynvml  # provided by nvidia-ml-py

        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            gpus = [_nvml_gpu(pynvml, i, detail) for i in range(pynvml.nvmlDeviceGetCount())]
            return {"source": "nvml", "driver": drv.decode() if isinstance(drv, bytes) else drv, "gpus": gpus}
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - fall through to nvidia-smi
        nvml_reason = f"NVML unavailable ({type(e).__name__}: {e})"
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"source": None, "reason": f"{nvml_reason}; nvidia-smi not found"}
    base = ["index", "name", "driver_version", "memory.used", "memory.total"]

    def run(fields):
        return subprocess.run([exe, "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)

    extra, note = [], None
    try:
        out = None
        if detail:
            extra = list(_SMI_DETAIL)
            out = run(base + [f for f, _, _ in extra])
            if out.returncode != 0:  # an older driver that lacks a field: the basic query
                note = f"detailed nvidia-smi query failed ({out.stderr.strip()[:120] or out.returncode})"
                extra, out = [], None
        if out is None:
            out = run(base)
    except Exception as e:  # noqa: BLE001
        return {"source": None, "reason": f"{nvml_reason}; nvidia-smi failed: {e}"}
    if out.returncode != 0:
        return {"source": None, "reason": f"{nvml_reason}; nvidia-smi exited {out.returncode}: "
                                          f"{out.stderr.strip()[:200]}"}
    gpus, driver = [], ""
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(base) + len(extra):
            continue
        idx, name, driver, used, total = parts[:5]
        g = {"index": int(idx), "name": name, "memory_used_mib": int(float(used)),
             "memory_total_mib": int(float(total))}
        for (field, key, conv), raw in zip(extra, parts[5:]):
            val = _smi_value(raw, conv)
            if val is None:
                g.setdefault("missing", []).append(f"{key} ({field}: {raw})")
            else:
                g[key] = val
        if "throttle_mask" in g:
            g["throttle_reasons"] = throttle_names(g["throttle_mask"])
        if detail and note:
            g["missing"] = [note]
        gpus.append(g)
    res = {"source": "nvidia-smi", "driver": driver, "gpus": gpus}
    if detail:
        res["nvml_reason"] = nvml_reason
    return res


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
