"""``lvsa info``: version, devices, backends and why each can or cannot run, settings."""
from __future__ import annotations

import argparse
import json

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
    info["problem"] = f"{kind} {dtype} B=1 T=81 P=1560 H=12 D={head_dim}"
    reasons = dispatch.explain(problem)
    bks = plugins.backends()
    rows = []
    for name, r in reasons.items():
        bk = bks.get(name)
        rows.append({"name": name, "distribution": getattr(bk, "distribution", None),
                     "version": getattr(bk, "distribution_version", None),
                     "available": not r, "reasons": r,
                     "description": getattr(bk, "description", "")})
    info["backends"] = rows
    info["auto_order"] = dispatch.auto_order(kind)
    try:
        sel = dispatch.select_backend(problem)
        info["auto_selects"] = sel.name
        info["selection_source"] = sel.source
    except Exception as e:  # noqa: BLE001 - shown to the user
        info["auto_selects"] = None
        info["selection_error"] = str(e)
    info["plugins"] = [r.__dict__ for r in plugins.plugin_records()]
    cfg = current_config()
    info["settings"] = cfg.active_env()
    return info


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
    print(f"backends (for a typical problem: {info['problem']}):")
    for b in info["backends"]:
        src = f"{b['distribution']} {b['version']}" if b["distribution"] else "not installed"
        state = "available" if b["available"] else "unavailable"
        print(f"  {b['name']:<11} [{src}] {state}")
        for r in b["reasons"]:
            print(f"      - {r}")
    print(f"auto order: {' > '.join(info['auto_order'])}; auto selects: {info['auto_selects']}")
    if info.get("selection_error"):
        print(f"  selection error: {info['selection_error']}")
    print("plugins:")
    for p in info["plugins"]:
        err = f" ({p['error']})" if p.get("error") else ""
        print(f"  {p['name']} from {p['distribution']} {p['version']}: {p['status']}{err}")
    if not info["plugins"]:
        print("  (none found in entry-point group 'lvsa')")
    print("settings: " + (", ".join(f"{k}={v}" for k, v in info["settings"].items()) or "(no LVSA_* set)"))
    if args.presets:
        from ..schedule import PRESETS
        print("presets:")
        for p in PRESETS.values():
            print(f"  {p.name:<18} family={p.family:<9} ref={p.reference_latent_frames} "
                  f"P={p.patches_per_frame()} ({p.default_height}x{p.default_width}) heads={p.num_heads} "
                  f"D={p.head_dim} text={p.text_tokens}")
    if args.vars:
        from ..config import env_table
        print(env_table())
    return 0
