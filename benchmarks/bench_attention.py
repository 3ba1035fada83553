"""Attention benchmark: dense SDPA (cuDNN, FlashAttention-2) against lvsa's sparse backends.

For each shape of ``/shared/reference/gpu-anchors.md`` (Wan 1.3B T_lat 21/41/81/121, Wan
14B 81, HunyuanVideo 1.5 49/65 with and without 256 text tokens, batch 1 and 2), in one
process: dense cuDNN SDPA, dense FA2 SDPA, ``flex`` (if installed), ``reference``,
``flashinfer``, ``triton``. Each sparse output is checked against the reference
(relative Frobenius error); the cold start (first call, compilation included) and the
attention memory beyond q, k, v and the output are recorded. Device name, driver and
memory come from NVML (nvidia-ml-py), falling back to ``nvidia-smi``.

Results: ``<out>/attention-<device>-<stamp>.json`` and ``.md`` (written after every
shape, so an interrupted run keeps what it measured).

    python benchmarks/bench_attention.py                      # the full set
    python benchmarks/bench_attention.py --shapes wan1.3b-t81 hy-t65-text --iters 5
    python benchmarks/bench_attention.py --sweep-triton 128,64,8,3 128,128,8,2

Times: median of ``--iters`` timed calls after ``--warmup`` calls, CUDA events.
``ideal`` = best dense time x density (density counts text keys when present).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from lvsa.backend import Problem
from lvsa.schedule import plan_schedule

P_DEFAULT = 1560
D_DEFAULT = 128


@dataclass(frozen=True)
class Shape:
    name: str
    model: str
    heads: int
    T: int
    reference: int
    text: int = 0
    batch: int = 1
    P: int = P_DEFAULT
    D: int = D_DEFAULT
    kv_heads: int = 0  # 0 = heads

    @property
    def S(self):
        return self.T * self.P


SHAPES = [
    Shape("wan1.3b-t21", "Wan 1.3B", 12, 21, 21),
    Shape("wan1.3b-t41", "Wan 1.3B", 12, 41, 21),
    Shape("wan1.3b-t81", "Wan 1.3B", 12, 81, 21),
    Shape("wan1.3b-t121", "Wan 1.3B", 12, 121, 21),
    Shape("wan14b-t81", "Wan 14B", 40, 81, 21),
    Shape("hy-t49", "HunyuanVideo 1.5", 16, 49, 33),
    Shape("hy-t65", "HunyuanVideo 1.5", 16, 65, 33),
    Shape("hy-t49-text", "HunyuanVideo 1.5", 16, 49, 33, text=256),
    Shape("hy-t65-text", "HunyuanVideo 1.5", 16, 65, 33, text=256),
    Shape("wan1.3b-t81-b2", "Wan 1.3B", 12, 81, 21, batch=2),
    Shape("hy-t65-text-b2", "HunyuanVideo 1.5", 16, 65, 33, text=256, batch=2),
    Shape("wan1.3b-t121-b2", "Wan 1.3B", 12, 121, 21, batch=2),
]
SHAPE_BY_NAME = {s.name: s for s in SHAPES}
SPARSE = ("flex", "reference", "flashinfer", "triton")


# ------------------------------------------------------------------ environment
def device_facts() -> dict:
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("triton", "flashinfer"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            facts[mod] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(torch_device=p.name, sm_count=p.multi_processor_count,
                     compute_capability=f"{p.major}.{p.minor}")
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        drv = pynvml.nvmlSystemGetDriverVersion()
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        facts.update(source="nvml", name=name.decode() if isinstance(name, bytes) else name,
                     driver=drv.decode() if isinstance(drv, bytes) else drv,
                     memory_total_mib=mem.total // 2**20, memory_used_mib=mem.used // 2**20)
    except Exception as e:  # noqa: BLE001 - fall back to nvidia-smi
        facts["nvml_error"] = f"{type(e).__name__}: {e}"
        try:
            line = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True,
                timeout=20).stdout.strip().splitlines()[0]
            name, drv, tot, used = (x.strip() for x in line.split(","))
            facts.update(source="nvidia-smi", name=name, driver=drv,
                         memory_total_mib=int(tot), memory_used_mib=int(used))
        except Exception as e2:  # noqa: BLE001
            facts["nvidia_smi_error"] = f"{type(e2).__name__}: {e2}"
    return facts


# ---------------------------------------------------------------------- timing
def cuda_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(out, ref) -> float:
    o = out.float()
    r = ref.float()
    if not torch.isfinite(o).all():
        return float("nan")
    return ((o - r).norm() / r.norm()).item()


def memory_probe(fn, out_bytes: int) -> int:
    """Bytes allocated during one call beyond its returned output (transient extra)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base - out_bytes)


# --------------------------------------------------------------------- running
def load_backends(names):
    """Backends through the lvsa registry (entry points), so the benchmark also proves
    the distributions register themselves."""
    found = {}
    try:
        from lvsa import plugins

        reg = plugins.backends()
    except Exception as e:  # noqa: BLE001
        print(f"[bench] lvsa registry unavailable ({e}); importing backends directly")
        reg = {}
    for n in names:
        if n in reg:
            found[n] = reg[n]
    print(f"[bench] registered backends: {sorted(reg)}; using {sorted(found)}")
    return found


def make_inputs(s: Shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hkv = s.kv_heads or s.heads

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    q = rnd(s.batch, s.S, s.heads, s.D)
    k = rnd(s.batch, s.S, hkv, s.D)
    v = rnd(s.batch, s.S, hkv, s.D)
    tk = tv = None
    if s.text:
        tk = rnd(s.batch, s.text, hkv, s.D)
        tv = rnd(s.batch, s.text, hkv, s.D)
    return q, k, v, tk, tv


def dense_fn(kind, q, k, v, tk, tv):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}[kind]
    if tk is not None:
        k = torch.cat([k, tk], 1)
        v = torch.cat([v, tv], 1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kt.shape[1] != qt.shape[1]

    def fn():
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)

    return fn


def bench_shape(s: Shape, backends, args, triton_configs):
    dtype = torch.bfloat16
    mask = plan_schedule(s.T, W=3, n=1, reference=s.reference).mask(0)
    nnz = mask.nnz()
    density_video = nnz / s.T ** 2
    keys_attended = nnz * s.P * s.P + s.S * s.text  # per (batch, head)
    density = keys_attended / (s.S * (s.S + s.text))
    flops = 4.0 * keys_attended * s.D * s.heads * s.batch
    q, k, v, tk, tv = make_inputs(s, dtype)
    qkvo = 4 * q.numel() * q.element_size()
    out_bytes = q.numel() * q.element_size()
    rec = {"shape": s.name, "model": s.model, "heads": s.heads, "kv_heads": s.kv_heads or s.heads,
           "T": s.T, "P": s.P, "D": s.D, "text": s.text, "batch": s.batch,
           "kfi": mask.key_frame_interval, "density_video": density_video,
           "density": density, "qkvo_bytes": qkvo, "results": {}}
    R = rec["results"]

    def log(name, r):
        extra = ""
        if "rel_err" in r:
            extra += f" err={r['rel_err']:.2e}"
        if "cold_s" in r:
            extra += f" cold={r['cold_s']:.2f}s"
        if "extra_mem_frac" in r:
            extra += f" mem+={100 * r['extra_mem_frac']:.2f}%"
        ms = r.get("ms")
        print(f"  {s.name:18s} {name:22s} " + (f"{ms:9.2f} ms" if ms else r.get("error", "")) + extra,
              flush=True)

    for kind in ("cudnn", "fa2"):
        if kind not in args.dense:
            continue
        try:
            fn = dense_fn(kind, q, k, v, tk, tv)
            ms = cuda_time(fn, args.warmup, args.iters)
            R[f"dense_{kind}"] = {"ms": ms, "tflops": 4.0 * s.S * (s.S + s.text) * s.D * s.heads
                                  * s.batch / ms / 1e9}
        except Exception as e:  # noqa: BLE001
            R[f"dense_{kind}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"dense_{kind}", R[f"dense_{kind}"])
        torch.cuda.empty_cache()

    problem = Problem.from_tensors(q, k, mask, tk)
    ref = None
    order = [n for n in ("reference", "flashinfer", "triton", "flex") if n in backends]
    for name in order:
        if name == "flex" and s.name not in args.flex_shapes and "all" not in args.flex_shapes:
            continue
        bk = backends[name]
        reasons = bk.not_supported_reasons(problem)
        if reasons:
            R[name] = {"error": "refused: " + "; ".join(reasons)}
            log(name, R[name])
            continue
        configs = [None]
        if name == "triton" and triton_configs:
            configs = triton_configs if args.sweep_triton else [None] + triton_configs
        for cfg in configs:
            key = name if cfg is None else f"triton[{','.join(map(str, cfg))}]"
            r = {}
            try:
                if cfg is not None:
                    os.environ["LVSA_TRITON_CONFIG"] = ",".join(map(str, cfg))
                torch.cuda.synchronize()
                a0 = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                handle = bk.plan(mask, problem)
                out = bk.run(handle, q, k, v, tk, tv, None)
                torch.cuda.synchronize()
                r["cold_s"] = time.perf_counter() - t0
                r["persistent_bytes"] = max(0, torch.cuda.memory_allocated() - a0 - out_bytes)
                if name == "reference":
                    ref = out
                    r["rel_err"] = 0.0
                else:
                    if ref is not None:
                        r["rel_err"] = rel_err(out, ref)
                    del out
                t1 = time.perf_counter()
                handle = bk.plan(mask, problem)
                r["plan_warm_ms"] = (time.perf_counter() - t1) * 1e3

                def fn():
                    return bk.run(handle, q, k, v, tk, tv, None)

                r["ms"] = cuda_time(fn, args.warmup, args.iters)
                if args.repeat_time:
                    r["ms_repeat"] = cuda_time(fn, 0, args.iters)
                r["tflops_eff"] = flops / r["ms"] / 1e9
                r["extra_bytes"] = memory_probe(fn, out_bytes)
                r["extra_mem_frac"] = r["extra_bytes"] / qkvo
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {e}"[:400]
            finally:
                if cfg is not None:
                    os.environ.pop("LVSA_TRITON_CONFIG", None)
            R[key] = r
            log(key, r)
        torch.cuda.empty_cache()
    del ref
    dense = [R[k]["ms"] for k in ("dense_cudnn", "dense_fa2") if R.get(k, {}).get("ms")]
    if dense:
        rec["ideal_ms"] = min(dense) * density
    return rec


def selfcheck(backends) -> list:
    """Small ragged problems (P not a multiple of the tiles, GQA, text, batch 2, both
    dtypes and head dims) against the reference computed in float32 on the GPU.
    FlashInfer is checked in bf16 / head_dim 128 only (each other combination is another
    ~90 s JIT build)."""
    rows = []
    cases = [  # T, P, H, Hkv, D, B, L, dtype, W, reference
        (9, 33, 4, 2, 64, 2, 20, torch.float16, 1, 4),
        (9, 33, 4, 4, 128, 1, 0, torch.bfloat16, 1, 4),
        (12, 200, 8, 2, 128, 2, 77, torch.bfloat16, 2, 5),
        (7, 1560, 4, 4, 128, 1, 256, torch.bfloat16, 1, 3),
        (41, 130, 6, 3, 64, 2, 0, torch.bfloat16, 3, 21),
        (33, 96, 4, 1, 128, 1, 0, torch.float16, 3, 21),
    ]
    ref = backends["reference"]
    for (T, P, H, Hkv, D, B, L, dt, W, refT) in cases:
        mask = plan_schedule(T, W=W, n=1, reference=refT).mask(1)
        g = torch.Generator(device="cuda").manual_seed(T * P)
        mk = lambda *sh: torch.randn(*sh, device="cuda", dtype=dt, generator=g)  # noqa: E731
        q, k, v = mk(B, T * P, H, D), mk(B, T * P, Hkv, D), mk(B, T * P, Hkv, D)
        tk, tv = (mk(B, L, Hkv, D), mk(B, L, Hkv, D)) if L else (None, None)
        f32 = [None if t is None else t.float() for t in (q, k, v, tk, tv)]
        expect = ref.run(ref.plan(mask, None), *f32, None)
        problem = Problem.from_tensors(q, k, mask, tk)
        for name in ("triton", "flashinfer", "flex"):
            if name not in backends:
                continue
            if name == "flashinfer" and (dt != torch.bfloat16 or D != 128):
                continue
            bk = backends[name]
            why = bk.not_supported_reasons(problem)
            if why:
                rows.append((name, T, P, H, Hkv, D, B, L, str(dt), "refused: " + "; ".join(why)))
                continue
            try:
                out = torch.full_like(q, float("nan"))
                out = bk.run(bk.plan(mask, problem), q, k, v, tk, tv, None)
                e = rel_err(out, expect)
                rows.append((name, T, P, H, Hkv, D, B, L, str(dt), f"{e:.2e}" + (" OK" if e < 1e-2 else " FAIL")))
            except Exception as ex:  # noqa: BLE001
                rows.append((name, T, P, H, Hkv, D, B, L, str(dt), f"{type(ex).__name__}: {ex}"[:200]))
            print("  selfcheck", rows[-1], flush=True)
    return rows


def summarize(rec):
    R = rec["results"]

    def ms(n):
        return R.get(n, {}).get("ms")

    out = {}
    fi, tr, fx, ideal = ms("flashinfer"), ms("triton"), ms("flex"), rec.get("ideal_ms")
    if fi and ideal:
        out["flashinfer_vs_ideal"] = ideal / fi
    if tr and ideal:
        out["triton_vs_ideal"] = ideal / tr
    if tr and fi:
        out["triton_speed_vs_flashinfer"] = fi / tr
    if fx and fi:
        out["flashinfer_speedup_vs_flex"] = fx / fi
    if fx and tr:
        out["triton_speedup_vs_flex"] = fx / tr
    rec["ratios"] = out
    return out


def markdown(meta, records) -> str:
    f = meta["device"]
    lines = [
        f"# lvsa attention benchmark — {f.get('name', '?')}",
        "",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        f"- device: {f.get('name')} (driver {f.get('driver')}, {f.get('memory_total_mib')} MiB, "
        f"via {f.get('source')}); torch {f.get('torch')} (CUDA {f.get('cuda')}), triton "
        f"{f.get('triton')}, flashinfer {f.get('flashinfer')}",
        f"- bf16, head_dim 128, P = 1560, mask W=3 n=1 offset 0; median of {meta['iters']} "
        f"timed calls after {meta['warmup']} warm-ups (CUDA events). ideal = best dense x density "
        "(density counts text keys). err = relative Frobenius error vs `reference` (bf16).",
        "",
        "| shape | B | text | density | cuDNN ms | FA2 ms | flex ms | reference ms | flashinfer ms "
        "| triton ms | ideal ms | FI/ideal | triton/FI speed | FI vs flex | triton vs flex "
        "| err FI / triton / flex | mem+ FI / triton |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(R, n):
        v = R.get(n, {}).get("ms")
        return f"{v:.1f}" if v else ("err" if "error" in R.get(n, {}) else "—")

    def fmt(x, p=2):
        return f"{x:.{p}f}" if x is not None else "—"

    for rec in records:
        R, r = rec["results"], rec.get("ratios", {})
        errs = " / ".join(f"{R[n]['rel_err']:.1e}" if "rel_err" in R.get(n, {}) else "—"
                          for n in ("flashinfer", "triton", "flex"))
        mem = " / ".join(f"{100 * R[n]['extra_mem_frac']:.2f}%" if "extra_mem_frac" in R.get(n, {})
                         else "—" for n in ("flashinfer", "triton"))
        lines.append(
            f"| {rec['shape']} (H={rec['heads']}, T={rec['T']}) | {rec['batch']} | {rec['text']} "
            f"| {rec['density']:.3f} | {ms(R, 'dense_cudnn')} | {ms(R, 'dense_fa2')} | {ms(R, 'flex')} "
            f"| {ms(R, 'reference')} | {ms(R, 'flashinfer')} | {ms(R, 'triton')} "
            f"| {fmt(rec.get('ideal_ms'), 1)} | {fmt(r.get('flashinfer_vs_ideal'))} "
            f"| {fmt(r.get('triton_speed_vs_flashinfer'))} | {fmt(r.get('flashinfer_speedup_vs_flex'))}x "
            f"| {fmt(r.get('triton_speedup_vs_flex'))}x | {errs} | {mem} |")
    lines += ["", "Effective TFLOP/s (attended blocks only) and cold starts:", "",
              "| shape | backend | ms | eff. TFLOP/s | cold start s | plan (warm) ms | persistent MiB |",
              "|---|---|---|---|---|---|---|"]
    for rec in records:
        for n, r in rec["results"].items():
            if n.startswith("dense") or "ms" not in r:
                continue
            lines.append(f"| {rec['shape']} | {n} | {r['ms']:.2f} | {r.get('tflops_eff', 0):.0f} "
                         f"| {r.get('cold_s', 0):.2f} | {r.get('plan_warm_ms', 0):.2f} "
                         f"| {r.get('persistent_bytes', 0) / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=[s.name for s in SHAPES],
                    help=f"shape names (default all): {', '.join(SHAPE_BY_NAME)}")
    ap.add_argument("--backends", nargs="*", default=list(SPARSE))
    ap.add_argument("--dense", nargs="*", default=["cudnn", "fa2"])
    ap.add_argument("--flex-shapes", nargs="*", default=["all"],
                    help="shapes on which to run flex (each new shape compiles)")
    ap.add_argument("--sweep-triton", nargs="*", default=[],
                    help="triton configs BLOCK_M,BLOCK_N,warps,stages to time side by side")
    ap.add_argument("--triton-extra", nargs="*", default=[],
                    help="configs timed in addition to the default triton run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeat-time", action="store_true", help="time twice (spread check)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting shapes after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--selfcheck", action="store_true",
                    help="first check small ragged problems (GQA, text, fp16, head_dim 64)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    from lvsa_cuda.triton_backend import parse_config

    triton_configs = [parse_config(c) for c in (args.sweep_triton or args.triton_extra)]
    t_start = time.perf_counter()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), "iters": args.iters,
            "warmup": args.warmup, "device": device_facts(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("LVSA_", "FLASHINFER_"))}}
    print(f"[bench] {json.dumps(meta['device'])}", flush=True)
    backends = load_backends(args.backends)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev = (meta["device"].get("name") or "gpu").replace("NVIDIA ", "").replace(" ", "-").lower()
    base = os.path.join(args.out, f"attention-{dev}{'-' + args.tag if args.tag else ''}-{stamp}")
    records = []
    if args.selfcheck:
        meta["selfcheck"] = selfcheck(backends)
    for name in args.shapes:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"[bench] budget of {args.budget_s}s reached; skipping {name} and later shapes")
            meta.setdefault("skipped", []).append(name)
            continue
        s = SHAPE_BY_NAME[name]
        t0 = time.perf_counter()
        rec = bench_shape(s, backends, args, triton_configs)
        summarize(rec)
        rec["wall_s"] = time.perf_counter() - t0
        print(f"  -> {s.name}: {json.dumps({k: round(v, 3) for k, v in rec['ratios'].items()})} "
              f"({rec['wall_s']:.0f}s)", flush=True)
        records.append(rec)
        meta["total_s"] = time.perf_counter() - t_start
        with open(base + ".json", "w") as fh:
            json.dump({"meta": meta, "records": records}, fh, indent=1)
        with open(base + ".md", "w") as fh:
            fh.write(markdown(meta, records))
        torch.cuda.empty_cache()
    print(markdown(meta, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
