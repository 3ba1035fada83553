"""``lvsa warmup``: build every able backend's kernels ahead of the first generation.

A backend that compiles on first use (FlashInfer's JIT: 77-97 s on an H200; FA4's CuTe
DSL: ~5 s; Triton: seconds) does it here instead, once per compile key (dtype, head dim,
text or not, GQA; FA4 also batch 1 and batch > 1 and the tokens per latent frame, a
constant of its mask_mod), for the shapes of the chosen model presets (their tokens per
frame at their default resolution, or ``--tokens-per-frame``) at batch 1 and 2; the compile caches on disk, so the next process starts warm
(a backend without an on-disk cache says how to get one: FA4 keeps its kernels in memory
unless ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``). Each kernel is built by one tiny
attention call through lvsa's dispatcher (the same ``[LVSA] compiling ...`` lines a first
generation would print).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub):
    p = sub.add_parser(
        "warmup", help="compile every backend's kernels for the configured shapes ahead of time",
        description=("Build the kernels of every backend that can run on the device (or those named "
                     "with --backends) for the head dims, dtypes and text/no-text of the chosen model "
                     "presets, reporting seconds per backend. Backends that do not compile are listed "
                     "as ready."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", nargs="*", default=None,
                   help="model presets whose shapes to build (default: every preset; `lvsa info --presets`)")
    p.add_argument("--head-dims", type=int, nargs="*", default=None,
                   help="head dims to build (default: those of the presets)")
    p.add_argument("--tokens-per-frame", type=int, nargs="*", default=None, metavar="P",
                   help="tokens per latent frame to build for (default: each preset's at its default "
                        "resolution; fa4 compiles per value, so give the P of another resolution here)")
    p.add_argument("--dtypes", nargs="*", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backends", nargs="*", default=None,
                   help="backends to build (default: every registered one that can run on the device)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, npu:0, cpu (default: the first accelerator)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_warmup)


def shapes_for(models, head_dims=None, tokens_per_frame=None):
    """Distinct ``(head_dim, text, P)`` triples of the presets ``models`` (``None``: all): each
    preset's head dim, text or not and tokens per frame at its default resolution; ``head_dims``
    replaces the head dims (every one with and without text as the presets have it),
    ``tokens_per_frame`` the P values."""
    from ..presets import PRESETS, get_preset

    presets = list(PRESETS.values()) if not models else [get_preset(m) for m in models]
    for P in tokens_per_frame or ():
        if P < 1:
            raise ValueError(f"--tokens-per-frame {P}: tokens per latent frame must be >= 1")
    if head_dims:
        dims = {(d, t) for d in head_dims for t in {bool(p.text_tokens) for p in presets}}
        Ps = set(tokens_per_frame or (p.patches_per_frame() for p in presets))
        return sorted((d, t, P) for d, t in dims for P in Ps)
    return sorted({(p.head_dim, bool(p.text_tokens), P) for p in presets
                   for P in (tokens_per_frame or (p.patches_per_frame(),))})


#: batch sizes warmed: a backend whose kernels depend on the batch (FA4: 1 or more) gets both
BATCHES = (1, 2)


def warmup(device=None, dtypes=("bfloat16",), shapes=((128, False, 1560),), backends=None, out=print):
    """Build the kernels; returns one record per backend: ``{"backend", "seconds",
    "built": [...], "cached": [...], "failed": {...}, "skipped": reason or None,
    "in_memory": hint or None}`` (``in_memory``: the kernels last only in this process)."""
    import torch

    from .. import dispatch, plugins
    from ..backend import Problem
    from ..devices import compute_capability, default_device
    from ..schedule import plan_schedule

    dev = torch.device(device) if device is not None else default_device()
    mask = plan_schedule(6, W=1, n=1, reference=2).mask(0)
    H = 2  # tiny: six frames of the shape's P, two heads
    bks = plugins.backends()
    names = backends or sorted(bks)
    records = []
    for name in names:
        bk = plugins.get_backend(name)
        rec = {"backend": name, "seconds": 0.0, "built": [], "cached": [], "failed": {}, "skipped": None,
               "in_memory": None}
        records.append(rec)
        unable = {}
        seen = set()
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for (D, text, P), B in ((s, b) for s in shapes for b in BATCHES):
                problem = Problem(dev.type, dtype, B, 6 * P, H, H, D, text_len=8 if text else 0, T=6, P=P,
                                  compute_capability=compute_capability(dev) if dev.type == "cuda" else None,
                                  device=dev)
                key = bk.compile_key(problem)
                if key in seen:  # the kernels of this key are built (batch does not change them)
                    continue
                seen.add(key)
                reasons = bk.not_supported_reasons(problem)
                if reasons:
                    unable[key] = "; ".join(reasons)
                    continue
                if not bk.compiles:
                    continue
                ready = dispatch.compile_ready(bk, problem)
                t = time.perf_counter()
                try:
                    g = torch.Generator().manual_seed(0)
                    q, k, v = (torch.randn(B, 6 * P, H, D, generator=g).to(dev, dtype) for _ in range(3))
                    tk = tv = torch.randn(B, 8, H, D, generator=g).to(dev, dtype) if text else None
                    dispatch.run_attention(q, k, v, mask, tk, tv, backend=name, origin="lvsa warmup")
                except Exception as e:  # noqa: BLE001 - reported per backend and key
                    rec["failed"][key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    continue
                dt = time.perf_counter() - t
                rec["seconds"] += dt
                rec["cached" if ready else "built"].append(key)
                if bk.compile_cache_dir() is None:
                    rec["in_memory"] = bk.compile_cache_hint or "its compiler keeps no on-disk cache lvsa knows of"
                out(f"warmup: {name} {key}: {'already cached' if ready else 'built'} in {dt:.1f}s")
        if backends:  # named: a shape it cannot build is a failure
            rec["failed"].update(unable)
        elif unable and not (rec["built"] or rec["cached"] or rec["failed"]):
            rec["skipped"] = f"cannot run on {dev}: {next(iter(unable.values()))}"
        if not bk.compiles and not rec["skipped"] and not rec["failed"]:
            rec["skipped"] = "does not compile (ready)"
    return records


def cmd_warmup(args) -> int:
    from .. import plugins

    shapes = shapes_for(args.model, args.head_dims, args.tokens_per_frame)
    if args.backends:
        for n in args.backends:
            plugins.get_backend(n)  # UnknownBackend names what is registered
    records = warmup(args.device, args.dtypes, shapes, args.backends,
                     out=(lambda s: None) if args.json else print)
    if args.json:
        print(json.dumps({"shapes": [{"head_dim": d, "text": t, "tokens_per_frame": P} for d, t, P in shapes],
                          "backends": records}, indent=1))
    else:
        for r in records:
            if r["built"] or r["cached"]:
                print(f"{r['backend']}: {r['seconds']:.1f}s ({len(r['built'])} built, {len(r['cached'])} already cached)")
                if r["in_memory"]:
                    print(f"  {r['backend']}: built in this process only, the next one compiles again: {r['in_memory']}")
            elif r["skipped"]:
                print(f"{r['backend']}: {r['skipped']}")
            for key, err in r["failed"].items():
                print(f"{r['backend']}: {key} FAILED: {err}", file=sys.stderr)
    return 1 if any(r["failed"] for r in records) else 0
