"""``lvsa bench attention``: one attention call per backend, dense SDPA as the baseline.

For each shape (Wan 1.3B T_lat 21/41/81/121, Wan 14B 81, HunyuanVideo 1.5 49/65 with and
without 256 text tokens, batch 1 and 2; ``--quick``: tiny shapes that run on a CPU), in one
process: the dense kernels of ``--dense`` (on CUDA SDPA's cuDNN and FlashAttention-2
kernels, each forced, and with ``fa4`` FlashAttention-4's dense forward; elsewhere the
default SDPA), then every lvsa backend that can run the problem (``reference``,
``flashinfer``, ``triton``, ``flex``, ``ascend`` …). Every backend's output is checked
against the reference (relative Frobenius error): when ``reference`` is not among the
timed backends its output is computed once per shape, untimed, for the check only (the
record's ``reference_check`` says which, or why no check was possible). The cold start
(first call, compilation included), the effective TFLOP/s (attended blocks only) and, on
CUDA, the attention memory beyond q, k, v and the output are recorded. ``ideal`` = the
fastest dense kernel's time x density (density counts text keys; ``ideal_from`` names
the kernel).

Results: ``<out>/attention-<device>[-tag]-<stamp>.{json,md,png}``, written after every
shape, so an interrupted run keeps what it measured. Times: median of ``--repeats``
timed calls after ``--warmup`` calls (device events on CUDA, wall clock elsewhere).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..ops import append_text
from . import common, kernels

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
    # HunyuanVideo 1.5 past 300 frames: the T_lat >= 81 shape with text
    Shape("hy-t81-text", "HunyuanVideo 1.5", 16, 81, 33, text=256),
    Shape("hy-t81-text-b2", "HunyuanVideo 1.5", 16, 81, 33, text=256, batch=2),
    Shape("wan1.3b-t121-b2", "Wan 1.3B", 12, 121, 21, batch=2),
    Shape("wan14b-t81-b2", "Wan 14B", 40, 81, 21, batch=2),
]
SHAPE_BY_NAME = {s.name: s for s in SHAPES}


# tiny shapes for --quick (CPU): above the horizon so the masks are sparse
QUICK_SHAPES = [
    Shape("quick-wan-t41", "tiny Wan", 2, 41, 21, P=24, D=32),
    Shape("quick-hy-t49-text", "tiny HunyuanVideo", 2, 49, 33, text=8, P=16, D=32),
    Shape("quick-wan-t41-b2", "tiny Wan", 2, 41, 21, batch=2, P=24, D=32),
]
SHAPE_BY_NAME.update({s.name: s for s in QUICK_SHAPES})


def add_arguments(p) -> None:
    a = p.add_argument_group("attention")
    a.add_argument("--shapes", nargs="*", help=f"shape names (default: all; --quick: the quick-* ones): "
                                               f"{', '.join(SHAPE_BY_NAME)}")
    a.add_argument("--dense", nargs="*", default=["cudnn", "fa2"], choices=DENSE_KINDS, metavar="KERNEL",
                   help="dense kernels to time, the ideal being the fastest: cudnn, fa2 (SDPA's, forced; on "
                        "CUDA, elsewhere the default SDPA runs) and fa4 (FlashAttention-4's dense forward, "
                        "flash_attn.cute: Hopper/Blackwell)")
    a.add_argument("--flex-shapes", nargs="*", default=["all"],
                   help="shapes on which to run flex (each new shape compiles)")
    a.add_argument("--sweep-triton", nargs="*", default=[],
                   help="triton configs BLOCK_M,BLOCK_N,warps,stages to time side by side")
    a.add_argument("--triton-extra", nargs="*", default=[],
                   help="configs timed in addition to the default triton run")
    a.add_argument("--repeat-time", action="store_true", help="time twice (spread check)")
    a.add_argument("--budget-s", type=float, default=0, help="stop starting shapes after this many seconds")
    a.add_argument("--selfcheck", action="store_true",
                   help="CUDA: first check small ragged problems (GQA, text, fp16, head_dim 64) vs float32")


# ----------------------------------------------------------------- measuring
def rel_err(out, ref) -> float:
    o = out.float()
    r = ref.float()
    if not torch.isfinite(o).all():
        return float("nan")
    return ((o - r).norm() / r.norm()).item()


def memory_probe(fn, out_bytes: int, device) -> Optional[int]:
    """Bytes allocated during one call beyond its returned output (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base - out_bytes)


def _reasons(bk, problem) -> List[str]:
    check = getattr(bk, "not_supported_reasons", None) or bk.supports
    return list(check(problem))


# --------------------------------------------------------------------- running
def load_backends(names):
    """Backends through the lvsa registry (entry points), so the benchmark also proves
    the distributions register themselves."""
    from .. import plugins

    reg = plugins.backends()
    found = {n: reg[n] for n in names if n in reg}
    missing = [n for n in names if n not in reg]
    print(f"[bench] registered backends: {sorted(reg)}; using {sorted(found)}"
          + (f"; not installed: {missing}" if missing else ""), file=sys.stderr)
    return found


def make_inputs(s: Shape, dtype, device, seed=0):
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    hkv = s.kv_heads or s.heads

    def rnd(*shape):
        return torch.randn(*shape, device=device if device.type == "cuda" else "cpu", dtype=dtype,
                           generator=g).to(device)

    q = rnd(s.batch, s.S, s.heads, s.D)
    k = rnd(s.batch, s.S, hkv, s.D)
    v = rnd(s.batch, s.S, hkv, s.D)
    tk = tv = None
    if s.text:
        tk = rnd(s.batch, s.text, hkv, s.D)
        tv = rnd(s.batch, s.text, hkv, s.D)
    return q, k, v, tk, tv


#: ``--dense`` kernels: SDPA's cuDNN and FlashAttention-2 (forced), FlashAttention-4's dense forward
DENSE_KINDS = kernels.CHOICES


class DenseUnavailable(Exception):
    """A dense kernel that cannot run here; ``reasons`` say why."""

    def __init__(self, reasons):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


def dense_kinds(requested, device) -> List[str]:
    """The dense kernels a run times on ``device``: ``--dense``'s SDPA kernels on CUDA (the
    default SDPA elsewhere), then ``fa4`` when asked for (it says itself where it cannot run)."""
    sdpa = [k_ for k_ in requested if k_ in kernels.SDPA_FORCED] if device.type == "cuda" else ["sdpa"]
    return sdpa + (["fa4"] if "fa4" in requested else [])


def dense_fn(kind, q, k, v, tk, tv):
    """A call of dense kernel ``kind`` (``sdpa``, ``cudnn``, ``fa2``, ``fa4``): every query
    over the video and text keys (text appended to the keys before, not timed);
    :class:`DenseUnavailable` when ``fa4`` cannot run here."""
    k, v = append_text(k, v, tk, tv)
    if kind == "fa4":
        fn, why = common.fa4_dense(q.device, q.dtype, q.shape[0], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        if why:
            raise DenseUnavailable(why)
        return lambda: fn(q, k, v)
    return kernels.sdpa_call(kind, q, k, v)


def bench_shape(s: Shape, backends, args, triton_configs, device, dtype, oracle=None):
    """One shape: the dense kernels, then every backend of ``backends``, each output checked
    against ``oracle`` (the reference backend; looked up when not given) — timed itself
    when ``reference`` is among ``backends``, else run once, untimed, for the check."""
    from ..backend import Problem
    from ..schedule import plan_schedule

    if oracle is None and "reference" not in backends:
        from .. import plugins

        oracle = plugins.backends().get("reference")
    mask = plan_schedule(s.T, W=3, n=1, reference=s.reference).mask(0)
    nnz = mask.nnz()
    density_video = nnz / s.T ** 2
    keys_attended = nnz * s.P * s.P + s.S * s.text  # per (batch, head)
    density = keys_attended / (s.S * (s.S + s.text))
    flops = 4.0 * keys_attended * s.D * s.heads * s.batch
    q, k, v, tk, tv = make_inputs(s, dtype, device)
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
        if r.get("extra_mem_frac") is not None:
            extra += f" mem+={100 * r['extra_mem_frac']:.2f}%"
        ms = r.get("ms")
        print(f"  {s.name:18s} {name:22s} " + (f"{ms:9.2f} ms" if ms else r.get("error", "")) + extra,
              file=sys.stderr, flush=True)

    for kind in dense_kinds(args.dense, device):
        try:
            fn = dense_fn(kind, q, k, v, tk, tv)
            common.synchronize(device)
            t0 = time.perf_counter()
            first = fn()  # the cold start (FA4 compiles here), then warm-ups as for the backends
            del first
            common.synchronize(device)
            cold = time.perf_counter() - t0
            ms = common.device_time_ms(fn, device, args.warmup, args.repeats)
            R[f"dense_{kind}"] = {"ms": ms, "cold_s": cold, "tflops": 4.0 * s.S * (s.S + s.text) * s.D * s.heads
                                  * s.batch / ms / 1e9}
        except DenseUnavailable as e:
            R[f"dense_{kind}"] = {"error": "refused: " + "; ".join(e.reasons)}
        except Exception as e:  # noqa: BLE001
            R[f"dense_{kind}"] = {"error": "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"[:300]}
        log(f"dense_{kind}", R[f"dense_{kind}"])
        common.free_memory(device)

    problem = Problem.from_tensors(q, k, mask, tk)
    # the output every backend's is checked against: the timed reference's, or (not timed)
    # the reference computed once here, untimed, for the check only
    check: Dict[str, Any] = {"mode": "timed" if "reference" in backends else "check only", "error": None}
    rec["reference_check"] = check
    ref = None
    if "reference" not in backends:
        ref, check["error"] = reference_output(oracle, mask, problem, q, k, v, tk, tv, device)
        common.free_memory(device)
    order = ["reference"] + [n for n in backends if n != "reference"]
    for name in [n for n in order if n in backends]:
        if name == "flex" and s.name not in args.flex_shapes and "all" not in args.flex_shapes:
            continue
        bk = backends[name]
        reasons = _reasons(bk, problem)
        if reasons:
            R[name] = {"error": "refused: " + "; ".join(reasons)}
            if name == "reference":
                check["error"] = R[name]["error"]
            log(name, R[name])
            continue
        configs = [None]
        if name == "triton" and triton_configs:
            configs = triton_configs if args.sweep_triton else [None] + triton_configs
        for cfg in configs:
            key = name if cfg is None else f"triton[{','.join(map(str, cfg))}]"
            r: Dict[str, Any] = {}
            try:
                if cfg is not None:
                    os.environ["LVSA_TRITON_CONFIG"] = ",".join(map(str, cfg))
                common.synchronize(device)
                a0 = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                t0 = time.perf_counter()
                handle = bk.plan(mask, problem)
                out = bk.run(handle, q, k, v, tk, tv, None)
                common.synchronize(device)
                r["cold_s"] = time.perf_counter() - t0
                if device.type == "cuda":
                    r["persistent_bytes"] = max(0, torch.cuda.memory_allocated() - a0 - out_bytes)
                if name == "reference":
                    ref = out
                    r["rel_err"] = 0.0
                else:
                    if ref is not None:
                        r["rel_err"] = rel_err(out, ref)
                    else:
                        r["unchecked"] = (f"the reference{' (check only)' if check['mode'] == 'check only' else ''}"
                                          f" did not run: {check.get('error') or 'no output'}")
                    del out
                t1 = time.perf_counter()
                handle = bk.plan(mask, problem)
                r["plan_warm_ms"] = (time.perf_counter() - t1) * 1e3

                def fn():
                    return bk.run(handle, q, k, v, tk, tv, None)

                r["ms"] = common.device_time_ms(fn, device, args.warmup, args.repeats)
                if args.repeat_time:
                    r["ms_repeat"] = common.device_time_ms(fn, device, 0, args.repeats)
                r["tflops_eff"] = flops / r["ms"] / 1e9
                r["extra_bytes"] = memory_probe(fn, out_bytes, device)
                r["extra_mem_frac"] = None if r["extra_bytes"] is None else r["extra_bytes"] / qkvo
            except Exception as e:  # noqa: BLE001
                r["error"] = "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"[:400]
                if name == "reference" and ref is None:
                    check["error"] = r["error"]
            finally:
                if cfg is not None:
                    os.environ.pop("LVSA_TRITON_CONFIG", None)
            R[key] = r
            log(key, r)
        common.free_memory(device)
    del ref
    set_ideal(rec)
    return rec


def reference_output(oracle, mask, problem, q, k, v, tk, tv, device):
    """``(output, None)`` of the reference backend ``oracle`` (one untimed call: the
    output the others are checked against), or ``(None, why)``: refused, OOM, an error."""
    if oracle is None:
        return None, "the reference backend is not registered"
    reasons = _reasons(oracle, problem)
    if reasons:
        return None, "refused: " + "; ".join(reasons)
    try:
        out = oracle.run(oracle.plan(mask, problem), q, k, v, tk, tv, None)
        common.synchronize(device)
        return out, None
    except Exception as e:  # noqa: BLE001 - no check is a result too
        return None, "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"[:300]


def fastest_dense(rec) -> Optional[str]:
    """The record's fastest dense kernel (``dense_<kind>``; ``None``: no dense time)."""
    return kernels.fastest({k_: r.get("ms") for k_, r in (rec.get("results") or {}).items()
                            if k_.startswith("dense_")})


def set_ideal(rec) -> None:
    """``rec["ideal_ms"]`` = the fastest dense kernel's time x density and
    ``rec["ideal_from"]`` that kernel (``dense_<kind>``); both ``None`` without a dense time."""
    best = fastest_dense(rec)
    density = rec.get("density")
    if best and density is not None:
        rec["ideal_ms"], rec["ideal_from"] = rec["results"][best]["ms"] * density, best
    else:
        rec["ideal_ms"], rec["ideal_from"] = None, None


def selfcheck(backends) -> list:  # CUDA only
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
    from ..backend import Problem
    from ..schedule import plan_schedule

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
            why = _reasons(bk, problem)
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
            print("  selfcheck", rows[-1], file=sys.stderr, flush=True)
    return rows


#: dense kernels of a record (``dense_<kind>``) and their column labels, in column order
DENSE_LABELS = {f"dense_{n}": label for n, (label, _) in kernels.KERNELS.items()}


def is_backend(name: str) -> bool:
    """A result of an lvsa backend (not a dense baseline, not a ``triton[cfg]`` sweep entry)."""
    return not name.startswith("dense_") and "[" not in name and name != "inputs"


def summarize(rec):
    """Per backend with a time: ``<backend>_vs_ideal`` (``ideal / ms``: 1.0 = the best dense
    kernel's per-FLOP speed on the attended blocks); ``rec["best_backend"]``: the fastest."""
    R = rec["results"]
    ideal = rec.get("ideal_ms")
    timed = {n: r["ms"] for n, r in R.items() if not n.startswith("dense_") and r.get("ms")}
    rec["ratios"] = {f"{n}_vs_ideal": ideal / ms for n, ms in timed.items()} if ideal else {}
    lvsa = {n: ms for n, ms in timed.items() if is_backend(n)}
    rec["best_backend"] = min(lvsa, key=lvsa.get) if lvsa else None
    return rec["ratios"]


def _err_cell(r) -> str:
    """A backend's error vs the reference: the relative error, ``n/c`` (not checked: the
    reason is in the notes), or — (no output, or a file from before every run checked)."""
    if "rel_err" in r:
        return f"{r['rel_err']:.1e}"
    return "n/c" if r.get("unchecked") else "—"


def notes(records, ideal: bool = True) -> List[str]:
    """Lines under the table: where the ideal came from (``ideal``), the dense kernels that
    could not run and why, whether the reference was timed or only computed for the check,
    and which outputs were not checked and why."""
    out = []
    if ideal:
        ran = [DENSE_LABELS.get(k, k) for k in DENSE_LABELS if any(r["results"].get(k, {}).get("ms")
                                                                   for r in records)]
        src: Dict[str, List[str]] = {}
        for rec in records:
            best = fastest_dense(rec)
            if best:
                src.setdefault(DENSE_LABELS.get(best, best), []).append(rec["shape"])
        if ran:
            out.append(f"ideal = the fastest of the dense kernels run ({', '.join(ran)}) x density; it came from "
                       + "; ".join(f"{k} ({'every shape' if len(v) == len(records) else ', '.join(v)})"
                                   for k, v in src.items()) + ".")
    why: Dict[tuple, List[str]] = {}
    for rec in records:
        for k_, r in rec["results"].items():
            e = r.get("error") or ""
            if k_.startswith("dense_") and e and e != "OOM":
                why.setdefault((DENSE_LABELS.get(k_, k_), e[len("refused: "):] if e.startswith("refused: ") else e),
                               []).append(rec["shape"])
    for (label, e), shapes in why.items():
        where = "every shape" if len(shapes) == len(records) else ", ".join(shapes)
        out.append(f"{label} not run ({where}): {e}")
    checks = [rec.get("reference_check") or {} for rec in records]
    only = [rec["shape"] for rec, c in zip(records, checks) if c.get("mode") == "check only" and not c.get("error")
            and not rec["results"].get("reference", {}).get("ms")]  # (a merged row may have an older timing)
    if only:
        where = "every shape" if len(only) == len(records) else ", ".join(only)
        out.append(f"reference: check only ({where}): not timed; its output computed once per shape, untimed, "
                   "for the err column, then freed.")
    for rec in records:
        left = [n for n, r in rec["results"].items() if r.get("unchecked")]
        if left:
            out.append(f"{rec['shape']}: {', '.join(left)} not checked (n/c): {rec['results'][left[0]]['unchecked']}")
    return out


def _cell(R, n):
    """A time cell: ms, OOM, n/a (refused), err, or — (not run)."""
    v = R.get(n, {}).get("ms")
    e = R.get(n, {}).get("error", "")
    return f"{v:.1f}" if v else ("OOM" if e == "OOM" else "n/a" if e.startswith("refused") else "err" if e else "—")


def table(records, src=None) -> List[str]:
    """The per-shape table of ``records`` (one run, or several merged): the dense kernels'
    and every backend's milliseconds (the columns are those present in the records), the
    ideal, each backend's ratio to it, the fastest backend, the errors against the
    reference and the memory beyond q, k, v and the output. ``src(rec, names)``: the
    source column of a merged table (the files the cells came from)."""
    dense = [k for k in DENSE_LABELS if any(k in r["results"] for r in records)]
    names = list(dict.fromkeys(n for r in records for n in r["results"] if is_backend(n)))
    checked = [n for n in names if n != "reference"]
    head = (["shape", "B", "text", "density"] + [f"{DENSE_LABELS[k]} ms" for k in dense]
            + [f"{n} ms" for n in names] + ["ideal ms"] + [f"{n}/ideal" for n in names] + ["best"]
            + ([f"err {' / '.join(checked)}", f"mem+ {' / '.join(checked)}"] if checked else [])
            + (["src"] if src else []))
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        R = rec["results"]
        ideal = rec.get("ideal_ms")
        timed = {n: R[n]["ms"] for n in names if R.get(n, {}).get("ms")}
        best = min(timed, key=timed.get) if timed else None
        errs = " / ".join(_err_cell(R.get(n, {})) for n in checked)
        mem = " / ".join(f"{100 * R[n]['extra_mem_frac']:.2f}%" if R.get(n, {}).get("extra_mem_frac") is not None
                         else "—" for n in checked)
        density = rec.get("density")
        cells = ([f"{rec['shape']} (H={rec.get('heads', '?')}, T={rec.get('T', '?')})", str(rec.get("batch", "?")),
                  str(rec.get("text", 0)), common.fmt(density, ".3f") if density == density else "—"]
                 + [_cell(R, k) for k in dense] + [_cell(R, n) for n in names]
                 + [common.fmt(ideal, ".1f")]
                 + [common.fmt(ideal / timed[n] if ideal and n in timed else None) for n in names]
                 + [best or "—"] + ([errs, mem] if checked else [])
                 + ([src(rec, dense + names)] if src else []))
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(meta, records) -> str:
    v = common.meta_versions(meta)
    fa4 = v.get("flash-attn-4")
    lines = [
        f"# lvsa attention benchmark — {common.meta_device(meta)}",
        "",
        f"- date: {meta['date']}; command: `{meta['command']}`",
        f"- torch {v.get('torch', '?')} (CUDA {v.get('cuda', '?')}), triton {v.get('triton', '?')}, "
        f"flashinfer {v.get('flashinfer', '?')}" + (f", flash-attn-4 {fa4}" if fa4 else "") + "; "
        f"{meta.get('dtype', 'bfloat16')}; mask W=3 n=1 offset 0; median of "
        f"{meta.get('repeats', meta.get('iters', '?'))} timed calls after {meta.get('warmup', '?')} warm-ups. "
        "ideal = best dense x density (density counts text keys); *backend*/ideal = ideal / its time "
        "(1.00: the best dense kernel's speed per attended FLOP); best = the fastest backend. "
        "err = relative Frobenius error vs `reference` (n/c: not checked, see below); mem+ = memory beyond "
        "q, k, v and the output.",
        "",
    ] + table(records)
    extra = notes(records)
    if extra:
        lines += [""] + [f"- {x}" for x in extra]
    lines += ["", "Effective TFLOP/s (attended blocks only) and cold starts:", "",
              "| shape | backend | ms | eff. TFLOP/s | cold start s | plan (warm) ms | persistent MiB |",
              "|---|---|---|---|---|---|---|"]
    for rec in records:
        for n, r in rec["results"].items():
            if n.startswith("dense") or "ms" not in r:
                continue
            lines.append(f"| {rec['shape']} | {n} | {r['ms']:.3f} | {r.get('tflops_eff', 0):.3g} "
                         f"| {r.get('cold_s', 0):.2f} | {r.get('plan_warm_ms', 0):.2f} "
                         f"| {(r.get('persistent_bytes') or 0) / 2**20:.1f} |")
    if meta.get("skipped"):
        lines += ["", "Skipped (time budget): " + ", ".join(meta["skipped"]) + "."]
    dev_notes = (meta.get("device_before") or {}).get("notes")
    if dev_notes:
        lines += ["", "Device record notes: " + "; ".join(dev_notes)]
    return "\n".join(lines) + "\n"


def plot(base: str, records) -> List[str]:
    """``<base>-time.png``: milliseconds per shape for dense and every backend."""
    plt = common.pyplot()
    names = list(dict.fromkeys(n for r in records for n in r["results"] if r["results"][n].get("ms")))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(records)), 4))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + i * width for j, r in enumerate(records) if r["results"].get(n, {}).get("ms")]
        ys = [r["results"][n]["ms"] for r in records if r["results"].get(n, {}).get("ms")]
        ax.bar(xs, ys, width, label=n)
    ideal = [(j + 0.4 - width / 2, r["ideal_ms"]) for j, r in enumerate(records) if r.get("ideal_ms")]
    ax.scatter([x for x, _ in ideal], [y for _, y in ideal], marker="_", s=400, color="black", label="ideal")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))])
    ax.set_xticklabels([r["shape"] for r in records], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ms per attention call")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = base + "-time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def compare_entries(data) -> Dict[tuple, Any]:
    return {(rec["shape"], n): (r.get("ms") or r.get("error")) for rec in data["records"]
            for n, r in rec["results"].items()}


def main(args) -> int:
    """Run ``lvsa bench attention`` (``args`` from :mod:`lvsa.commands.bench`)."""
    from .. import devices

    if args.device and args.device.startswith("npu"):
        devices.npu_status()  # imports torch_npu, which registers the "npu" device type
    device = torch.device(args.device) if args.device else devices.default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    shapes = args.shapes or [s.name for s in (QUICK_SHAPES if args.quick else SHAPES)]
    unknown = [n for n in shapes if n not in SHAPE_BY_NAME]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPE_BY_NAME)}")
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    old = common.load_results(args.compare) if args.compare else None
    triton_configs = []
    if args.sweep_triton or args.triton_extra:
        from lvsa_cuda.triton_backend import parse_config

        triton_configs = [parse_config(c) for c in (args.sweep_triton or args.triton_extra)]
    t_start = time.perf_counter()
    meta = common.run_meta("lvsa bench attention", args.argv, device)
    meta.update(dtype=str(dtype).replace("torch.", ""), warmup=args.warmup, repeats=args.repeats, skipped=[])
    from .. import plugins

    backends = load_backends(args.backends or sorted(plugins.backends()))
    oracle = plugins.backends().get("reference")  # checks every output, timed or not
    base = common.out_base(args.out, "attention", meta["device_before"], args.tag)
    records = []
    if args.selfcheck:
        if device.type == "cuda" and "reference" in backends:
            meta["selfcheck"] = selfcheck(backends)
        else:
            meta["selfcheck"] = "skipped: needs CUDA"
    bar = common.Progress(len(shapes), "bench attention", enabled=not args.no_progress)
    try:
        for name in shapes:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                meta["skipped"].append(name)
                bar.update()
                continue
            s = SHAPE_BY_NAME[name]
            bar.set(name)
            t0 = time.perf_counter()
            try:
                rec = bench_shape(s, backends, args, triton_configs, device, dtype, oracle)
            except Exception as e:  # noqa: BLE001 - the inputs themselves did not fit
                rec = {"shape": s.name, "model": s.model, "T": s.T, "batch": s.batch, "text": s.text,
                       "heads": s.heads, "density": float("nan"),
                       "results": {"inputs": {"error": "OOM" if common.is_oom(e) else f"{type(e).__name__}: {e}"}}}
            summarize(rec)
            rec["wall_s"] = time.perf_counter() - t0
            print(f"  -> {s.name}: " + ", ".join(f"{k}={v:.3f}" for k, v in rec["ratios"].items())
                  + f"; best {rec['best_backend']} ({rec['wall_s']:.0f}s)", file=sys.stderr, flush=True)
            records.append(rec)
            meta["total_s"] = time.perf_counter() - t_start
            common.save(base, meta, records, markdown)
            common.free_memory(device)
            bar.update()
    finally:
        bar.close()
    meta["device_after"] = common.device_state(device)
    common.finish(base, meta, records, markdown, plot, old, compare_entries)
    return 0


