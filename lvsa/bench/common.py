"""What both benchmarks share: the device record, timers, output files, ``--compare``.

The device record says what the numbers were measured on and in what state: NVIDIA GPUs
through NVML (nvidia-ml-py; name, driver, memory, power, SM clock, throttle reasons),
falling back to ``nvidia-smi``; Ascend NPUs through ``npu-smi`` (:mod:`lvsa.npu_smi`) and
``torch.npu``; the CPU's model name. A tool that is missing is a note in the record,
never an error.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import __version__, devices


# ------------------------------------------------------------------ environment
def versions() -> Dict[str, str]:
    """Versions of everything that changes the numbers (``unavailable (…)`` when missing)."""
    out = {"lvsa": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda), "platform": platform.platform()}
    for mod in ("triton", "flashinfer", "diffusers", "torch_npu", "transformers"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception as e:  # noqa: BLE001 - a broken optional package is a note
            out[mod] = f"unavailable ({type(e).__name__})"
    from importlib import metadata

    for dist in ("flash-attn-4", "nvidia-cutlass-dsl"):  # the fa4 backend's kernel library
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def code_state() -> Dict[str, Any]:
    """The code that ran, beyond the versions: the git commit of the working directory (and
    whether it had local changes; ``None`` outside a checkout, e.g. a copied tree) and each
    registered backend's :attr:`~lvsa.backend.Backend.variant` where it has one."""
    import subprocess

    from .. import plugins

    def git(*args):
        try:
            r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    variants = {}
    try:
        variants = {n: b.variant for n, b in sorted(plugins.backends().items()) if getattr(b, "variant", "")}
    except Exception as e:  # noqa: BLE001 - a broken plugin is the dispatcher's to report, not the record's
        variants = {"error": f"{type(e).__name__}: {e}"[:200]}
    return {"git_commit": commit, "git_dirty": dirty, "backend_variants": variants}


def device_state(device) -> Dict[str, Any]:
    """The state of the device ``device`` (taken before and after a run); never raises.

    ``{"kind", "notes": [...], "gpus"|"npus"|"cpu": ...}`` — ``notes`` names each tool
    that could not be asked and why.
    """
    kind, _, index = str(device).partition(":")
    rec: Dict[str, Any] = {"kind": kind, "time": _now(), "notes": []}
    try:
        if kind == "cuda":
            inv = devices.nvidia_inventory(detail=True)
            rec["source"] = inv.get("source")
            if inv.get("source") is None:
                rec["notes"].append(inv.get("reason", "no NVIDIA tool answered"))
            else:
                rec["driver"] = inv.get("driver")
                rec["gpus"] = inv["gpus"]
                if inv.get("nvml_reason"):
                    rec["notes"].append(inv["nvml_reason"] + "; used nvidia-smi")
            if torch.cuda.is_available():
                idx = int(index) if index else torch.cuda.current_device()
                p = torch.cuda.get_device_properties(idx)
                rec["torch_device"] = {"index": idx, "name": p.name, "sm_count": p.multi_processor_count,
                                       "compute_capability": f"{p.major}.{p.minor}",
                                       "total_memory_mib": p.total_memory // 2**20}
        elif kind == "npu":
            from .. import npu_smi

            r = npu_smi.query(usages=True)
            if isinstance(r, str):
                rec["notes"].append(r)
            else:
                rec["source"] = "npu-smi"
                rec["npu_smi"] = r.to_dict()
                rec["npus"] = [n.describe() for n in r.npus]
            st = devices.npu_status()
            if st.available:
                rec["torch_npu"] = [d.describe() for d in st.devices]
            else:
                rec["notes"].append(st.reason or "torch.npu unavailable")
        rec["cpu"] = {"name": devices.cpu_name(), "cores": os.cpu_count()}
    except Exception as e:  # noqa: BLE001 - the record never breaks a benchmark
        rec["notes"].append(f"device record failed: {type(e).__name__}: {e}")
    return rec


def describe_device(state: Dict[str, Any]) -> str:
    """One line for tables: ``NVIDIA H200 (driver …, 143771 MiB)`` / the NPU / the CPU."""
    if state.get("gpus"):
        g = state["gpus"][0]
        extra = f", {len(state['gpus'])} GPUs" if len(state["gpus"]) > 1 else ""
        return f"{g['name']} (driver {state.get('driver')}, {g['memory_total_mib']} MiB{extra}, via {state['source']})"
    if state.get("torch_device"):
        t = state["torch_device"]
        return f"{t['name']} ({t['total_memory_mib']} MiB, sm_{t['compute_capability'].replace('.', '')})"
    if state.get("npus"):
        return state["npus"][0]
    if state.get("torch_npu"):
        return state["torch_npu"][0]
    return f"CPU: {state.get('cpu', {}).get('name', '?')} ({state.get('cpu', {}).get('cores')} cores)"


def meta_device(meta: Dict[str, Any]) -> str:
    """:func:`describe_device` of a results file's device record. Files written before
    lvsa had one (``benchmarks/bench_attention.py``) keep the GPU in ``meta["device"]``."""
    if isinstance(meta.get("device_before"), dict):
        return describe_device(meta["device_before"])
    d = meta.get("device")
    if isinstance(d, dict) and d.get("name"):
        return f"{d['name']} (driver {d.get('driver')}, {d.get('memory_total_mib')} MiB, via {d.get('source')})"
    return str(d or "?")


def meta_versions(meta: Dict[str, Any]) -> Dict[str, str]:
    """A results file's versions (the older files keep them in ``meta["device"]``)."""
    if isinstance(meta.get("versions"), dict):
        return meta["versions"]
    d = meta.get("device") if isinstance(meta.get("device"), dict) else {}
    return {k: str(d[k]) for k in ("torch", "cuda", "python", "triton", "flashinfer") if k in d}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_meta(prog: str, argv: Optional[Sequence[str]], device) -> Dict[str, Any]:
    """Date, the exact command, versions, relevant environment and the device before."""
    args = list(sys.argv[1:] if argv is None else argv)
    env_keys = ("LVSA_", "FLASHINFER_", "CUDA_VISIBLE_DEVICES", "NCCL_", "TORCH_", "ASCEND_",
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "TRITON_INTERPRET")
    return {"date": _now(), "command": " ".join([prog] + [shlex.quote(a) for a in args]),
            "argv": list(sys.argv),
            "cwd": os.getcwd(), "versions": versions(), "code": code_state(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(env_keys)},
            "device": str(device), "device_before": device_state(device)}


# ----------------------------------------------------------- FA4 dense kernel
#: why FlashAttention-4's dense forward cannot run where lvsa-cuda (which holds the fa4 backend) is absent
NO_FA4_BACKEND = ("the fa4 backend is not installed (pip install lvsa-cuda[fa4]: FlashAttention-4's kernels "
                  "come with it)")


def fa4_dense(device, dtype, batch: int, keys: int, heads: int, kv_heads: int, head_dim: int
              ) -> Tuple[Optional[Callable], List[str]]:
    """FlashAttention-4's dense forward for dense calls over ``keys`` keys (text keys among
    them) as ``(fn, [])`` — ``fn(q, k, v, text_k=None, text_v=None,
    scale=None)`` on ``[B, S, H, D]`` tensors, the ``fa4`` backend's :meth:`dense` — or
    ``(None, reasons)``: the fa4 backend's own reasons why it cannot run here (FA4 not
    installed or not importable, not a Hopper/Blackwell GPU, ...)."""
    from .. import plugins
    from ..backend import Problem

    bk = plugins.backends().get("fa4")
    if bk is None or not all(callable(getattr(bk, m, None)) for m in ("dense", "dense_reasons")):
        return None, [NO_FA4_BACKEND]
    dev = torch.device(device)
    cc = devices.compute_capability(dev) if dev.type == "cuda" else None
    problem = Problem(device_kind=dev.type, dtype=dtype, batch=batch, seq_len=keys, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, compute_capability=cc, device=dev)
    why = list(bk.dense_reasons(problem))
    return (None, why) if why else (bk.dense, [])


# ---------------------------------------------------------------------- timing
def synchronize(device) -> None:
    devices.synchronize(device)


def device_time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup`` (events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _event_module(device: torch.device):
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        return getattr(torch, "npu", None)
    return None


class RegionTimer:
    """Total device time spent inside wrapped functions (outermost call only).

    On CUDA/NPU each outermost call records a start and an end event on the current
    stream (no synchronisation inside the forward); on the CPU it reads the wall clock.
    Nested wrapped calls (the reference backend's SDPA inside ``Engine.attention``) are
    counted once.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._mod = _event_module(self.device)
        if self._mod is not None and not hasattr(self._mod, "Event"):
            self._mod = None
        self._depth = 0
        self._pairs: List[Tuple[Any, Any]] = []
        self._cpu = 0.0
        self.calls = 0
        self.enabled = True

    def reset(self):
        self._pairs.clear()
        self._cpu = 0.0
        self.calls = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*a, **kw):
            if not self.enabled or self._depth:
                self._depth += 1
                try:
                    return fn(*a, **kw)
                finally:
                    self._depth -= 1
            self._depth += 1
            self.calls += 1
            try:
                if self._mod is not None:
                    s, e = self._mod.Event(enable_timing=True), self._mod.Event(enable_timing=True)
                    s.record()
                    out = fn(*a, **kw)
                    e.record()
                    self._pairs.append((s, e))
                    return out
                t = time.perf_counter()
                out = fn(*a, **kw)
                self._cpu += time.perf_counter() - t
                return out
            finally:
                self._depth -= 1
        timed.__wrapped__ = fn
        return timed

    def total_s(self) -> float:
        """Seconds inside the wrapped calls since :meth:`reset` (synchronises)."""
        if self._mod is None:
            return self._cpu
        synchronize(self.device)
        return sum(s.elapsed_time(e) for s, e in self._pairs) / 1e3


@contextlib.contextmanager
def patched(targets: Iterable[Tuple[Any, str]], wrap: Callable[[Callable], Callable]):
    """Replace ``obj.attr`` by ``wrap(obj.attr)`` for every present target; undo after."""
    done = []
    try:
        for obj, attr in targets:
            if obj is None or not hasattr(obj, attr):
                continue
            orig = getattr(obj, attr)
            in_dict = attr in getattr(obj, "__dict__", {})
            setattr(obj, attr, wrap(orig))
            done.append((obj, attr, orig, in_dict))
        yield
    finally:
        for obj, attr, orig, in_dict in reversed(done):
            if in_dict or not hasattr(type(obj), attr):
                setattr(obj, attr, orig)
            else:
                delattr(obj, attr)


class MemoryPeak:
    """Peak device memory during a block: the allocator's peak (``torch``) and, on NVIDIA,
    the peak that NVML saw for the whole device (sampled every ``interval`` seconds on a
    thread: it includes the allocator's cache and other processes)."""

    def __init__(self, device, interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.alloc_peak: Optional[int] = None
        self.reserved_peak: Optional[int] = None
        self.nvml_peak_mib: Optional[int] = None
        self._stop = threading.Event()
        self._thread = None

    def _nvml_loop(self, pynvml, handle):
        peak = 0
        while True:
            try:
                peak = max(peak, pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except Exception:  # noqa: BLE001
                break
            if self._stop.wait(self.interval):
                break
        self.nvml_peak_mib = peak // 2**20 if peak else None

    def __enter__(self):
        devices.reset_peak_memory(self.device)
        if self.device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
                # NVML counts physical GPUs: map through CUDA_VISIBLE_DEVICES when it is set
                vis = os.environ.get("CUDA_VISIBLE_DEVICES")
                if vis and all(x.strip().isdigit() for x in vis.split(",")):
                    idx = int(vis.split(",")[idx])
                h = pynvml.nvmlDeviceGetHandleByIndex(idx)
                self._thread = threading.Thread(target=self._nvml_loop, args=(pynvml, h), daemon=True)
                self._thread.start()
            except Exception:  # noqa: BLE001 - no NVML: the allocator's figures only
                self._thread = None
        return self

    def __exit__(self, *exc):
        st = devices.memory_stats(self.device)
        if st is not None:
            self.alloc_peak = st["peak"]
            mod = _event_module(self.device)
            try:
                self.reserved_peak = int(mod.max_memory_reserved(self.device))
            except Exception:  # noqa: BLE001
                self.reserved_peak = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
        return False

    def as_dict(self) -> Dict[str, Any]:
        gib = 2**30
        return {"peak_alloc_gib": None if self.alloc_peak is None else self.alloc_peak / gib,
                "peak_reserved_gib": None if self.reserved_peak is None else self.reserved_peak / gib,
                "nvml_peak_used_gib": None if self.nvml_peak_mib is None else self.nvml_peak_mib / 1024}


def is_oom(e: BaseException) -> bool:
    """Out of device memory (CUDA, NPU or a CPU allocation failure)."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory(device) -> None:
    gc.collect()
    mod = _event_module(torch.device(device))
    if mod is not None:
        try:
            mod.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


# -------------------------------------------------------------------- progress
class Progress:
    """A progress bar on stderr (tqdm when installed; plain lines otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.n, self.desc = total, 0, desc
        self._bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True,
                             leave=True)
        except Exception:  # noqa: BLE001
            self._bar = None

    def set(self, text: str):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        else:
            print(f"[{self.desc} {self.n}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, k: int = 1):
        self.n += k
        if self._bar is not None:
            self._bar.update(k)

    def write(self, line: str):
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------- output
def out_base(out_dir: str, kind: str, device_state_: Dict[str, Any], tag: str = "") -> str:
    """``<out>/<kind>-<device>[-tag]-<stamp>`` (device: ``h200``, ``cpu``, ``npu`` …)."""
    os.makedirs(out_dir, exist_ok=True)
    if device_state_.get("gpus"):
        dev = device_state_["gpus"][0]["name"]
    elif device_state_.get("torch_device"):
        dev = device_state_["torch_device"]["name"]
    else:
        dev = device_state_.get("kind", "cpu")
    dev = dev.replace("NVIDIA ", "").replace(" ", "-").lower()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir, f"{kind}-{dev}{'-' + tag if tag else ''}-{stamp}")


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Atomic write (an interrupted run keeps the previous complete file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def load_results(path: str, option: str = "--compare") -> Dict[str, Any]:
    """A results JSON file; errors name ``option`` (what gave the path) and the cause."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{option}: {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{option}: {path} is a folder; give a results .json file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{option}: {path} is not a results JSON file ({e})") from None
    if not isinstance(data, dict) or "meta" not in data or "records" not in data:
        raise ValueError(f"{option}: {path} is not an lvsa bench results file (no 'meta'/'records')")
    return data


def fmt(x, spec: str = ".2f", none: str = "—") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)


def compare_lines(new: Dict[str, Any], old: Dict[str, Any],
                  entries: Callable[[Dict[str, Any]], Dict[Tuple, Any]]) -> List[str]:
    """One line per entry present in both files: new / old time (> 1: slower now)."""
    a, b = entries(new), entries(old)
    lines = [f"compare: {old.get('meta', {}).get('command', '?')} ({old.get('meta', {}).get('date', '?')})",
             f"{'entry':60s} {'old':>10s} {'new':>10s} {'new/old':>8s}"]
    both = [k for k in a if k in b]
    for k in both:
        va, vb = a[k], b[k]
        name = " ".join(str(x) for x in k)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb > 0:
            lines.append(f"{name:60s} {vb:10.4g} {va:10.4g} {va / vb:8.3f}")
        else:
            lines.append(f"{name:60s} {fmt(vb, '.4g'):>10s} {fmt(va, '.4g'):>10s} {'—':>8s}")
    only_new = [k for k in a if k not in b]
    only_old = [k for k in b if k not in a]
    if only_new:
        lines.append(f"only in the new file: {len(only_new)} entries")
    if only_old:
        lines.append(f"only in the old file: {len(only_old)} entries")
    if not both:
        lines.append("no entry is in both files")
    return lines


def save(base: str, meta: Dict[str, Any], records: List[Dict[str, Any]],
         markdown: Callable[[Dict[str, Any], List[Dict[str, Any]]], str]) -> List[str]:
    """Write ``<base>.json`` and ``<base>.md`` (after every row: an interrupted run keeps them)."""
    write_json(base + ".json", {"meta": meta, "records": records})
    write_text(base + ".md", markdown(meta, records))
    return [base + ".json", base + ".md"]


def finish(base: str, meta: Dict[str, Any], records: List[Dict[str, Any]],
           markdown: Callable[[Dict[str, Any], List[Dict[str, Any]]], str],
           plot: Callable[[str, List[Dict[str, Any]]], List[str]], compare: Optional[Dict[str, Any]],
           compare_entries: Callable[[Dict[str, Any]], Dict[Tuple, Any]]) -> List[str]:
    """The last write: JSON, Markdown, the plots (or a note why not), the table and
    ``--compare`` on stdout. Returns the files written."""
    files = [base + ".json", base + ".md"]
    why = plots_available()
    if why:
        meta.setdefault("notes", []).append(why)
        print(f"[bench] plots skipped: {why}", file=sys.stderr)
    elif records:
        files += plot(base, records)
    save(base, meta, records, markdown)
    print(markdown(meta, records))
    print("results: " + ", ".join(files))
    if compare:
        print("\n".join(compare_lines({"meta": meta, "records": records}, compare, compare_entries)))
    return files


def plots_available() -> Optional[str]:
    """``None`` when matplotlib imports, else why not (plots are then skipped, loudly)."""
    try:
        import matplotlib  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001
        return f"matplotlib unavailable ({type(e).__name__}: {e}); pip install 'lvsa[bench]' for the plots"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
