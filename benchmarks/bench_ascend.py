"""Ascend NPU benchmark: dense npu_fusion_attention vs lvsa's ascend and reference backends.

    python benchmarks/bench_ascend.py [--shapes wan1.3b-t81 hy-t65-text ...] [--iters 5]

On an Atlas A2/A3 machine with torch_npu and CANN: one attention call per shape (bf16,
head_dim 128, P = 1560, mask W=3 n=1 offset 0), median of ``--iters`` timed calls after two
warm-ups, each sparse output checked against the reference, device memory through
``torch.npu`` and the card's state through ``npu-smi`` (name, health, power, temperature,
AI Core %, HBM), before and after. Writes ``ascend-<tag>.json`` and ``.md`` to ``--out``.

Not yet run on Ascend hardware (none is reachable where lvsa is developed); CI runs it on
tiny shapes against the CPU emulation of torch_npu (tests/test_bench_ascend.py).
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch

import lvsa
from lvsa import devices, npu_smi
from lvsa.ops import append_text
from lvsa.plugins import get_backend

#: name -> (heads, T_lat, text tokens, batch, reference horizon), as in gpu-anchors.md
SHAPES = {
    "wan1.3b-t81": (12, 81, 0, 1, 21), "wan1.3b-t121": (12, 121, 0, 1, 21),
    "wan14b-t81": (40, 81, 0, 1, 21), "wan1.3b-t81-b2": (12, 81, 0, 2, 21),
    "hy-t49": (16, 49, 0, 1, 33), "hy-t65": (16, 65, 0, 1, 33),
    "hy-t65-text": (16, 65, 256, 1, 33), "hy-t65-text-b2": (16, 65, 256, 2, 33),
}


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        devices.synchronize(device)
        t = time.perf_counter()
        fn()
        devices.synchronize(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def smi_state():
    r = npu_smi.query(usages=True)
    return r if isinstance(r, str) else [n.__dict__ if hasattr(n, "__dict__") else str(n) for n in r.npus]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--device", default="npu:0")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tokens-per-frame", type=int, default=1560)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--frames", type=int, default=None, help="override T_lat (small runs)")
    ap.add_argument("--heads", type=int, default=None, help="override the heads (small runs)")
    ap.add_argument("--reference", type=int, default=None, help="override the reference horizon (small runs)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--tag", default="npu")
    args = ap.parse_args(argv)

    import torch_npu  # noqa: F401 - fails loudly where there is no Ascend stack

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    ascend, reference = get_backend("ascend"), get_backend("reference")
    P, D = args.tokens_per_frame, args.head_dim
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_ascend.py " + " ".join(argv or []),
            "torch": torch.__version__, "torch_npu": getattr(torch_npu, "__version__", "?"),
            "device": args.device, "npu_status": devices.npu_status().__dict__.get("reason") or "available",
            "npu_smi_before": smi_state()}
    rows = []
    for name in args.shapes:
        H, T, L, B, ref = SHAPES[name]
        H, T = args.heads or H, args.frames or T
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        q, k, v = mk(B, T * P, H, D), mk(B, T * P, H, D), mk(B, T * P, H, D)
        tk, tv = (mk(B, L, H, D), mk(B, L, H, D)) if L else (None, None)
        mask = lvsa.plan_schedule(T, 3, 1, args.reference or ref, tokens_per_frame=P).mask(0)
        scale = D ** -0.5
        kk, vv = append_text(k, v, tk, tv)
        dense = lambda: torch_npu.npu_fusion_attention(q, kk, vv, H, "BSND", scale=scale)[0]  # noqa: E731
        pr, pa = reference.plan(mask, None), ascend.plan(mask, None)
        ref_out = reference.run(pr, q, k, v, tk, tv, scale)
        asc_out = ascend.run(pa, q, k, v, tk, tv, scale)
        err = float((asc_out.float() - ref_out.float()).norm() / ref_out.float().norm())
        row = {"shape": name, "B": B, "H": H, "T": T, "P": P, "text": L, "density": round(mask.density(), 4),
               "dense_ms": timed(dense, device, args.warmup, args.iters),
               "reference_ms": timed(lambda: reference.run(pr, q, k, v, tk, tv, scale), device,
                                     args.warmup, args.iters),
               "ascend_ms": timed(lambda: ascend.run(pa, q, k, v, tk, tv, scale), device,
                                  args.warmup, args.iters),
               "err_ascend_vs_reference": err, "memory": devices.memory_stats(device)}
        row["ideal_ms"] = row["dense_ms"] * row["density"]
        row["ascend_vs_ideal"] = row["ideal_ms"] / row["ascend_ms"]
        rows.append(row)
        print(f"{name:<16} dense {row['dense_ms']:9.2f} ms  reference {row['reference_ms']:9.2f} ms  "
              f"ascend {row['ascend_ms']:9.2f} ms  ascend/ideal {row['ascend_vs_ideal']:.2f}  err {err:.1e}",
              flush=True)
    meta["npu_smi_after"] = smi_state()
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"ascend-{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    md = [f"# lvsa on Ascend — {args.device}", "", f"- {meta['date']}; `{meta['command']}`",
          f"- npu-smi: {meta['npu_smi_before'] if isinstance(meta['npu_smi_before'], str) else 'recorded in JSON'}",
          "", "| shape | B | text | density | dense ms | reference ms | ascend ms | ascend/ideal | err |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['B']} | {r['text']} | {r['density']} | {r['dense_ms']:.2f} | "
           f"{r['reference_ms']:.2f} | {r['ascend_ms']:.2f} | {r['ascend_vs_ideal']:.2f} | "
           f"{r['err_ascend_vs_reference']:.1e} |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    return rows


if __name__ == "__main__":
    main()
