"""``lvsa info``: version, devices, backends and why each can or cannot run, settings."""
from __future__ import annotations

import argparse
import json
from typing import Optional

from .. import __version__
from ._args import positive_int


# ------------------------------------------------------------------ info
def register(sub):
    p = sub.add_parser(
        "info", help="version, devices, backends and why each can or cannot run, LVSA_* settings",
        description=("Report the lvsa version, the devices found, every registered backend "
                     "(distribution, version, availability and the reasons it cannot run a "
                     "typical problem on this machine), plugins, and the active LVSA_* settings."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the typical problem the reasons are given for")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dim of the typical problem")
    p.add_argument("--presets", action="store_true", help="also list the model presets")
    p.add_argument("--vars", action="store_true", help="also list every LVSA_* variable with its default")
    p.set_defaults(func=cmd_info)


def gather_info(dtype: str = "bfloat16", head_dim: int = 128) -> dict:
    import platform

    import torch

    from .. import devices, dispatch, plugins
    from ..api import current_config
    from ..backend import Problem

    info = {"lvsa": __version__, "python": platform.python_version(), "torch": torch.__version__}
    devs = devices.all_devices()
    info["devices"] = [d.describe() for d in devs]
    npu = devices.npu_status()
    info["npu"] = {"installed": npu.installed, "importable": npu.importable,
                   "available": npu.available, "reason": npu.reason}
    if torch.cuda.is_available():
        info["nvidia"] = devices.nvidia_inventory()
    from .. import npu_smi
    info["npu-smi"] = npu_smi.query_summary()
    kind = devices.default_device_kind()
    dev = next(d for d in devs if d.kind == kind)
    problem = Problem(device_kind=kind, dtype=getattr(torch, dtype), batch=1, seq_len=81 * 1560,
                      num_heads=12, num_kv_heads=12, head_dim=head_dim, text_len=0, T=81, P=1560,
                      compute_capability=dev.compute_capability, device_index=dev.index)
    density = _typical_density(81)
    info["problem"] = f"{kind} {dtype} B=1 T=81 P=1560 H=12 D={head_dim} density={density:.3f}"
    info["problem_density"] = density
    # the diagnostic never crashes: a registry that cannot load (two backends with one
    # name) is shown with the distributions involved instead of raised
    clash = plugins.name_clash()
    info["name_clash"] = None if clash is None else {
        "backend": getattr(clash, "backend", None),
        "distributions": list(getattr(clash, "distributions", ())), "message": str(clash)}
    rows = []
    if clash is None:
        reasons = dispatch.explain(problem)
        bks = plugins.backends()
        for name, r in reasons.items():
            bk = bks[name]
            rows.append({"name": name, "distribution": bk.distribution,
                         "version": bk.distribution_version,
                         "available": not r, "reasons": r, "auto_rank": bk.auto_rank(kind),
                         "compiles": bool(bk.compiles),
                         "compile_cached": dispatch.compile_ready(bk, problem) if bk.compiles else None,
                         "compile_in_memory": _in_memory_hint(bk),
                         "description": bk.description})
        info["auto_order"] = dispatch.auto_order(kind)
        try:
            sel = dispatch.select_backend(problem, density=density)
            info["auto_selects"] = sel.name
            info["selection_source"] = sel.source
            info["selection_why"] = sel.why
            info["shape_class"] = str(sel.shape)
        except Exception as e:  # noqa: BLE001 - shown to the user
            info["auto_selects"] = None
            info["selection_error"] = str(e)
    else:
        info["auto_order"] = []
        info["auto_selects"] = None
        info["selection_error"] = str(clash)
    info["backends"] = rows
    info["plugins"] = [r.__dict__ for r in plugins.plugin_records()]
    if clash is None:
        from ..config import unknown_variables
        info["unknown_variables"] = unknown_variables(extra=plugins.declared_settings())
    try:
        cfg = current_config()
        info["settings"] = cfg.active_env()
    except ValueError as e:  # a bad LVSA_* value: show it, do not crash
        info["settings"] = {}
        info["settings_error"] = str(e)
    return info


def _in_memory_hint(bk) -> Optional[str]:
    """For a compiling backend without an on-disk compile cache: how to get one (its
    kernels are otherwise built again in every process); else ``None``."""
    if not bk.compiles:
        return None
    try:
        if bk.compile_cache_dir() is not None:
            return None
    except Exception as e:  # noqa: BLE001 - a diagnostic never crashes: say what happened
        return f"compile_cache_dir() raised {type(e).__name__}: {e}"
    return bk.compile_cache_hint or "no on-disk compile cache known"


def _typical_density(T: int) -> float:
    """Mask density of the configured schedule (Wan's reference horizon) at ``T`` latent frames."""
    from ..config import current_config
    from ..schedule import plan_schedule

    try:
        cfg = current_config()
    except ValueError:  # a bad LVSA_* value is reported below; use the defaults here
        from ..config import Config
        cfg = Config()
    sched = plan_schedule(T, W=cfg.latent_window(), n=cfg.latent_first_frames(),
                          reference=cfg.reference_for("wan"), scale=cfg.sparsity_scale)
    return sched.mask(0).density()


def cmd_info(args) -> int:
    info = gather_info(args.dtype, args.head_dim)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"lvsa {info['lvsa']}  python {info['python']}  torch {info['torch']}")
    print("devices: " + "; ".join(info["devices"]))
    n = info["npu"]
    print("ascend npu: " + ("available" if n["available"] else n["reason"]))
    if info.get("npu-smi"):
        print(f"npu-smi:\n  {info['npu-smi']}")
    nv = info.get("nvidia")
    if nv:
        if nv.get("source"):
            print(f"nvidia ({nv['source']}): driver {nv['driver']}; " + "; ".join(
                f"{g['index']}: {g['name']} {g['memory_used_mib']}/{g['memory_total_mib']} MiB" for g in nv["gpus"]))
        else:
            print(f"nvidia: {nv['reason']}")
    if info.get("name_clash"):
        c = info["name_clash"]
        print(f"backend name clash: {c['message']}")
        if c["distributions"]:
            print(f"  distributions involved: {', '.join(c['distributions'])}")
    print(f"backends (for a typical problem: {info['problem']}):")
    for b in info["backends"]:
        src = f"{b['distribution']} {b['version']}" if b["distribution"] else "not installed"
        state = "available" if b["available"] else "unavailable"
        if b.get("compiles") and b["available"]:
            state += ", compiles on first use (" + (
                "cached" if b["compile_cached"] else
                f"once per process: {b['compile_in_memory']}" if b.get("compile_in_memory") else
                "not cached: `lvsa warmup`") + ")"
        print(f"  {b['name']:<11} [{src}] {state}")
        for r in b["reasons"]:
            print(f"      - {r}")
    print(f"auto order (declared rank): {' > '.join(info['auto_order']) or '-'}; "
          f"auto selects: {info['auto_selects']}")
    if info.get("selection_why"):
        print(f"  why: {info['selection_why']}")
    print("  (backends of other distributions appear here once installed: see the README's "
          "Backends section)")
    if info.get("selection_error"):
        print(f"  selection error: {info['selection_error']}")
    print("plugins:")
    for p in info["plugins"]:
        err = f" ({p['error']})" if p.get("error") else ""
        print(f"  {p['name']} from {p['distribution']} {p['version']}: {p['status']}{err}")
    if not info["plugins"]:
        print("  (none found in entry-point group 'lvsa')")
    print("settings: " + (", ".join(f"{k}={v}" for k, v in info["settings"].items()) or "(no LVSA_* set)"))
    if info.get("settings_error"):
        print(f"  settings error: {info['settings_error']}")
    for name, near in (info.get("unknown_variables") or {}).items():
        print(f"  {name} is set but nothing reads it" + (f" (did you mean {near}?)" if near else ""))
    if args.presets:
        from ..presets import PRESETS
        print("presets:")
        for p in PRESETS.values():
            print(f"  {p.name:<18} family={p.family:<9} ref={p.reference_latent_frames} "
                  f"P={p.patches_per_frame()} ({p.default_height}x{p.default_width}) heads={p.num_heads} "
                  f"D={p.head_dim} text={p.text_tokens}")
    if args.vars:
        from ..config import env_table
        from ..plugins import declared_settings
        print(env_table(declared_settings() if not info.get("name_clash") else ()))
    return 0
