"""Context-parallel check: N ranks against one, per backend, at real attention shapes.

    torchrun --nproc-per-node 2 benchmarks/cp_check.py [--out DIR]
        [--backends flashinfer triton reference] [--shapes wan1.3b-t81 hy1.5-t65-text256]
        [--transformer wan1.3b] [--transformer-frames 81] [--batch 1] [--time 0]
    torchrun --nproc-per-node 2 benchmarks/cp_check.py --device cpu --small   # gloo smoke run

Every rank computes the single-device result itself (same seeded inputs on every rank),
then the same call split over the ranks, in Ulysses mode (heads split) and in sequence
mode (query rows split, K/V all-gathered), and compares its share of the output with the
single-device rows: max |diff|, relative L2 error, bit-identical or not.

1. Attention shapes (bf16, head_dim 128, P = 1560, W=3 n=1, rotation offset 1): Wan 1.3B
   at T_lat 81 (12 heads, S = 126 360) and HunyuanVideo 1.5 at T_lat 65 + 256 text tokens
   (16 heads), through :func:`lvsa.attention` with each backend named explicitly.
2. A real-size Wan 1.3B ``WanTransformer3DModel`` (random weights, the diffusers
   architecture, 30 blocks) forward at T_lat 81, 480x832: lvsa enabled on the bare
   transformer with ``context_parallel=`` ulysses / sequence against lvsa on one rank.
   ``--time N`` adds N timed forwards of each (median; 0 = correctness only).

Writes ``cp-check-<tag>.json`` and ``.md`` (rank 0) to ``--out`` (default ``$OUT`` when
set, else ``benchmarks/results``). Exit status 0 when every case passes its tolerance,
1 otherwise; a case that raises is recorded with its error and the run goes on.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

import lvsa
from lvsa import parallel
from lvsa.backend import Problem
from lvsa.devices import compute_capability
from lvsa.plugins import get_backend
from lvsa.schedule import plan_schedule

#: name -> heads, T_lat, text tokens, reference horizon (tokens per frame 1560, head_dim 128)
SHAPES = {
    "wan1.3b-t81": dict(heads=12, T=81, L=0, ref=21),
    "hy1.5-t65-text256": dict(heads=16, T=65, L=256, ref=33),
}
#: --small (CPU smoke run): frames cut by the rank boundaries, text on one shape
SMALL_SHAPES = {
    "small-video": dict(heads=4, T=9, L=0, ref=4),
    "small-text": dict(heads=4, T=9, L=5, ref=4),
}
#: diffusers WanTransformer3DModel configurations (as in the published checkpoints)
TRANSFORMERS = {
    "wan1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "small": dict(num_attention_heads=4, attention_head_dim=12, ffn_dim=32, num_layers=2),
}
TOL_ATTENTION = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
TOL_TRANSFORMER = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def log(msg):
    if parallel.global_rank() == 0:
        print(msg, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(part, ref):
    d = (part.float() - ref.float())
    ref_norm = ref.float().norm().item()
    return {"max_abs_diff": d.abs().max().item(), "rel_l2": d.norm().item() / max(ref_norm, 1e-30),
            "bit_identical": bool(torch.equal(part, ref)), "finite": bool(torch.isfinite(part).all())}


def timed(fn, device, iters):
    """Median of ``iters`` calls, every rank starting together: one untimed call and a
    barrier first, so one rank's one-time work (a Triton kernel compiled for its row range,
    a FlashInfer plan) is not timed as another rank's wait in the first collective."""
    if iters and torch.distributed.is_initialized():
        fn()
        sync(device)
        torch.distributed.barrier()
    ts = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) if ts else None


def backend_reasons(name, q, k, mask, tk, q_rows=None):
    try:
        return get_backend(name).not_supported_reasons(Problem.from_tensors(q, k, mask, tk, q_rows))
    except Exception as e:  # noqa: BLE001 - unknown backend name
        return [f"{type(e).__name__}: {e}"]


def run_case(record, fn):
    """Run one case on every rank; a failure on any rank is recorded, the run goes on."""
    try:
        record.update(fn())
        err = None
    except Exception as e:  # noqa: BLE001
        err = f"rank {parallel.global_rank()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, err)
    errors = [e for e in errors if e]
    if errors:
        record["error"] = "; ".join(errors)
    return record


def gather_worst(record, keys=("max_abs_diff", "rel_l2")):
    """Every rank's comparison → the worst over ranks (rank 0 writes it)."""
    mine = {k: record.get(k) for k in keys + ("bit_identical", "finite")}
    allr = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(allr, mine)
    out = {}
    for k in keys:
        vals = [a[k] for a in allr if a and a.get(k) is not None]
        out[k] = max(vals) if vals else None
    out["bit_identical"] = all(a and a.get("bit_identical") for a in allr)
    out["finite"] = all(a and a.get("finite") for a in allr)
    return out


def check_modes(results, base, srec, world, heads, S, run_cp, tol, label, timing):
    """Ulysses and sequence mode of one case: ``run_cp(mode)`` → comparison on every rank."""
    for mode in ("ulysses", "sequence"):
        rec = {**base, "mode": mode}
        if "error" in srec:
            rec["error"] = "single-device run failed: " + srec["error"]
        elif (mode == "ulysses" and heads % world) or S % world:
            rec["skipped"] = f"{heads} heads / {S} tokens do not divide by {world} ranks"
        else:
            run_case(rec, lambda m=mode: run_cp(m))
            if "error" not in rec:
                rec.update(gather_worst(rec))
                rec["tolerance"] = tol
                rec["pass"] = rec["finite"] and rec["rel_l2"] <= tol
        results.append(rec)
        log(f"  {label} {mode}: " + (rec.get("error") or rec.get("skipped") or (
            f"rel_l2={rec['rel_l2']:.2e} max|d|={rec['max_abs_diff']:.2e} bit-identical={rec['bit_identical']}"
            + timing(rec))))


# ------------------------------------------------------------- attention shapes
def attention_cases(args, device, dtype, world):
    shapes = SMALL_SHAPES if args.small else {k: SHAPES[k] for k in args.shapes}
    P = 12 if args.small else 1560
    D = 16 if args.small else 128
    results = []
    for sname, sh in shapes.items():
        T, H, L = sh["T"], sh["heads"], sh["L"]
        S = T * P
        mask = plan_schedule(T, W=3 if not args.small else 1, n=1, reference=sh["ref"]).mask(1)
        g = torch.Generator(device=device).manual_seed(1234)
        r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
        q, k, v = r(args.batch, S, H, D), r(args.batch, S, H, D), r(args.batch, S, H, D)
        tk, tv = (r(args.batch, L, H, D), r(args.batch, L, H, D)) if L else (None, None)
        for name in args.backends:
            reasons = backend_reasons(name, q, k, mask, tk)
            base = {"kind": "attention", "shape": sname, "backend": name, "T": T, "P": P, "heads": H,
                    "text": L, "batch": args.batch, "S": S}
            if reasons:
                results.append({**base, "mode": "-", "skipped": "; ".join(reasons)})
                log(f"  {sname} {name}: skipped ({'; '.join(reasons)})")
                continue

            def attend(q_, k_, v_, tk_, tv_, rows, _n=name):
                return lvsa.attention(q_, k_, v_, mask, tk_, tv_, backend=_n, q_rows=rows)

            single = {}

            def do_single(_n=name):
                single["out"] = attend(q, k, v, tk, tv, None)
                rec = {"single_ms": None}
                if args.time:
                    rec["single_ms"] = 1e3 * timed(lambda: attend(q, k, v, tk, tv, None), device, args.time)
                return rec

            srec = run_case({}, do_single)

            def run_cp(mode):
                cp = parallel.ContextParallel(mode=mode)
                lo, hi = cp.rows(S)
                ql, kl, vl = (t[:, lo:hi].contiguous() for t in (q, k, v))
                res = compare(cp.attention(attend, ql, kl, vl, tk, tv), single["out"][:, lo:hi])
                if args.time:
                    res["cp_ms"] = 1e3 * timed(lambda: cp.attention(attend, ql, kl, vl, tk, tv), device, args.time)
                    res["single_ms"] = srec.get("single_ms")
                return res

            check_modes(results, base, srec, world, H, S, run_cp, TOL_ATTENTION[dtype], f"{sname} {name}",
                        lambda r: f" single={r.get('single_ms') or 0:.1f}ms cp={r.get('cp_ms') or 0:.1f}ms"
                        if args.time else "")
            single.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------- transformer forward
def transformer_cases(args, device, dtype, world):
    from diffusers import WanTransformer3DModel

    from lvsa import integrations

    cfg = TRANSFORMERS["small" if args.small else args.transformer]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096 if not args.small else 32,
            freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=1024, **cfg)
    model = model.to(dtype).eval()
    h, w = (6, 8) if args.small else (60, 104)  # 480x832 / 8
    results = []
    for T in args.transformer_frames if not args.small else [25]:  # small: sparse (T > 21), frames cut
        g = torch.Generator(device=device).manual_seed(99)
        inputs = dict(
            hidden_states=torch.randn(args.batch, 16, T, h, w, generator=g, device=device).to(dtype),
            timestep=torch.full((args.batch,), 500, device=device),
            encoder_hidden_states=torch.randn(args.batch, 512 if not args.small else 8,
                                              4096 if not args.small else 32, generator=g, device=device).to(dtype),
            return_dict=False)
        for name in args.backends:
            base = {"kind": "transformer", "model": "small" if args.small else args.transformer, "T": T,
                    "batch": args.batch, "backend": name, "S": T * (h // 2) * (w // 2)}
            S, H, D = T * (h // 2) * (w // 2), cfg["num_attention_heads"], cfg["attention_head_dim"]
            reasons = get_backend(name).not_supported_reasons(Problem(
                device.type, dtype, args.batch, S, H, H, D, T=T, P=S // T, device_index=device.index,
                compute_capability=compute_capability(device) if device.type == "cuda" else None))
            if reasons:
                results.append({**base, "mode": "-", "skipped": "; ".join(reasons)})
                log(f"  transformer T{T} {name}: skipped ({'; '.join(reasons)})")
                continue
            ref = {}

            def fwd(**settings):
                integrations.enable(model, backend=name, **settings)
                try:
                    with torch.no_grad():
                        return model(**inputs)[0]
                finally:
                    integrations.disable(model)

            def do_single():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ref["out"] = fwd()
                rec = {}
                if args.time:
                    rec["single_s"] = timed(fwd, device, args.time)
                if device.type == "cuda":
                    rec["single_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                return rec

            srec = run_case({}, do_single)

            def run_cp(mode):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = compare(fwd(context_parallel=mode), ref["out"])
                if args.time:
                    res["cp_s"] = timed(lambda: fwd(context_parallel=mode), device, args.time)
                    res["single_s"] = srec.get("single_s")
                if device.type == "cuda":
                    res["cp_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                    res["single_peak_gb"] = srec.get("single_peak_gb")
                return res

            check_modes(results, base, srec, world, H, S, run_cp, TOL_TRANSFORMER[dtype],
                        f"transformer T{T} {name}",
                        lambda r: f" single={r.get('single_s') or 0:.2f}s cp={r.get('cp_s') or 0:.2f}s"
                        if args.time else "")
            ref.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------- report
def write_report(args, results, meta):
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cp-check-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    lines = [f"# Context-parallel check ({meta['world_size']} ranks, {meta['device']}, {meta['dtype']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; torch {meta['torch']}; lvsa "
             f"{meta['lvsa']}; {meta['gpu']}", "",
             "Each rank's share of the N-rank output against the same rows of the 1-rank output "
             "(worst rank shown).", "",
             "| kind | case | backend | mode | rel L2 | max abs diff | bit-identical | pass | 1-rank | N-rank | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        case = r.get("shape") or f"{r.get('model')} T{r.get('T')} B{r.get('batch')}"
        if r["kind"] == "attention":
            t1 = f"{r['single_ms']:.1f} ms" if r.get("single_ms") else ""
            tn = f"{r['cp_ms']:.1f} ms" if r.get("cp_ms") else ""
        else:
            t1 = f"{r['single_s']:.2f} s" if r.get("single_s") else ""
            tn = f"{r['cp_s']:.2f} s" if r.get("cp_s") else ""
        note = r.get("error") or r.get("skipped") or ""
        if r.get("cp_peak_gb"):
            note = f"peak {r['single_peak_gb']:.1f} → {r['cp_peak_gb']:.1f} GB/rank " + note
        fmt = (lambda x: f"{x:.2e}" if isinstance(x, float) else "")
        lines.append(f"| {r['kind']} | {case} | {r['backend']} | {r['mode']} | {fmt(r.get('rel_l2'))} | "
                     f"{fmt(r.get('max_abs_diff'))} | {r.get('bit_identical', '')} | {r.get('pass', '')} | "
                     f"{t1} | {tn} | {note} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--backends", nargs="*", default=None, help="default flashinfer triton reference (cpu: reference)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--transformer", default="wan1.3b", choices=["wan1.3b", "wan14b", "none"])
    ap.add_argument("--transformer-frames", type=int, nargs="*", default=[81])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--time", type=int, default=0, metavar="N", help="N timed repetitions per case (0: none)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--dist-timeout", type=float, default=float(os.environ.get("LVSA_DIST_TIMEOUT", 300)),
                    help="seconds a rank waits in a collective (LVSA_DIST_TIMEOUT; default %(default)s)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.backends is None:
        args.backends = ["flashinfer", "triton", "reference"] if args.device == "cuda" else ["reference"]
    os.environ["LVSA_DIST_TIMEOUT"] = str(args.dist_timeout)
    os.environ.setdefault("LVSA_WARN_FALLBACK", "1")
    args.tag = args.tag or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if parallel.env_world_size() < 2:
        print("cp_check: run it under torchrun with 2 or more processes, e.g.\n"
              "  torchrun --nproc-per-node 2 benchmarks/cp_check.py", file=sys.stderr)
        return 2
    with parallel.distributed(args.device) as info:
        device = info.device or torch.device(args.device)
        world = info.world_size
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        meta = {"world_size": world, "device": str(device.type), "dtype": str(dtype).replace("torch.", ""),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "lvsa": lvsa.__version__, "gpu": gpu,
                "command": "torchrun --nproc-per-node %d benchmarks/cp_check.py %s" % (world, " ".join(argv or sys.argv[1:])),
                "env": {k: v for k, v in os.environ.items() if k.startswith(("LVSA_", "NCCL_NVLS", "TORCH_SYMM"))}}
        log(f"cp_check: {world} ranks on {device.type} ({gpu}), {meta['dtype']}, backends {args.backends}")
        results = attention_cases(args, device, dtype, world)
        if info.is_main:  # written now too: a later hang (timeout) keeps these results
            write_report(args, results, meta)
        if args.transformer != "none":
            results += transformer_cases(args, device, dtype, world)
        ok = all(r.get("pass") for r in results if "skipped" not in r)
        if info.is_main:
            stem = write_report(args, results, meta)
            log(f"cp_check: {'PASS' if ok else 'FAIL'}; wrote {stem}.json and {stem}.md")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
