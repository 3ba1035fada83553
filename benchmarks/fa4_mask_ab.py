"""What the fa4 backend's partial tiles cost, and which mask_mod to ship: an A/B on one GPU.

    python3 benchmarks/fa4_mask_ab.py --tag TAG [--out DIR] [--shapes NAME ...] [--iters 5]

FA4 runs a tile cut by a frame boundary (a *partial* tile, ~10 % of the tiles at Wan's
T_lat 81) through lvsa's ``mask_mod`` element by element; every other tile runs unmasked.
Per shape (``lvsa bench attention``'s presets, the video keys only; the text pass is timed
on its own) this times FA4's block-sparse forward four ways:

- ``table``   the fa4 backend's mask_mod: it loads the query row's frame, the key's frame and
              the frame mask;
- ``mulhi``   a candidate: the key's frame computed as a multiply-high,
              ``(n * ceil(2^32 / P)) >> 32`` (exact while ``keys * P <= 2^32``), one load fewer;
- ``true``    a mask_mod that returns True: FA4's masked path without lvsa's work (the
              output is wrong: a bound, not a candidate);
- ``nomask``  the partial tiles listed as full tiles: no masked path at all (wrong output:
              the bound of any mask_mod).

The two real kinds are checked against the reference backend (relative L2) and against each
other (same arithmetic: they must agree bit for bit). Measured on the H200 (11-30): ``mulhi``
is 0.94-1.005x ``table`` and stays out of the backend (this script keeps it, to re-measure). Where the shape has text, the exact text
merge that follows FA4's call (``attend_text_into``, a Triton kernel) is timed at two query
tile heights, beside the whole ``fa4`` call with text. Writes ``fa4-mask-ab-TAG-STAMP.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from lvsa import plugins
from lvsa.backend import Problem
from lvsa.bench import common
from lvsa.bench.attention import SHAPE_BY_NAME, make_inputs, rel_err
from lvsa.schedule import plan_schedule

VARIANTS = ("table", "mulhi", "true", "nomask")
SHAPES = ["wan1.3b-t81", "wan14b-t81", "hy-t65-text", "wan1.3b-t121"]


def mulhi_exact(P: int, keys: int) -> bool:
    """``(n * ceil(2^32 / P)) >> 32 == n // P`` for every ``0 <= n < keys``: the error term stays
    below ``1 / P`` while ``keys * P <= 2^32``; ``P >= 3`` keeps the multiplier inside an int32."""
    return P >= 3 and keys * P <= 2 ** 32


def mulhi_aux(t, P: int):
    """``mulhi``'s aux tensors from the backend's tables: the query frames, the frame mask
    zero-padded for padded keys (their computed frame passes the last), the multiplier."""
    T = t.allowed.shape[0]
    tn = t.tile[1]
    allowed = torch.zeros(T, T + -(-tn // P), dtype=torch.int32, device=t.allowed.device)
    allowed[:, :T] = t.allowed
    k_div = torch.tensor([-(-2 ** 32 // P)], dtype=torch.int32, device=t.allowed.device)
    return [t.q_frame, allowed, k_div]


def mulhi_torch(q_idx, kv_idx, aux):
    """What :func:`mulhi_mask_mod` computes, in torch (for FA4's CPU stand-in)."""
    q_frame, allowed, k_div = aux
    fk = (kv_idx.long() * int(k_div[0])) >> 32
    return allowed[q_frame[q_idx.long()].long()[:, None], fk[None, :]] != 0


def mulhi_mask_mod():
    """The ``mulhi`` candidate in CuTe: one load per row, a multiply-high per key, the frame mask."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def lvsa_frame_mask_mulhi(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        q_frame, allowed, k_div = aux_tensors[0], aux_tensors[1], aux_tensors[2]
        fq = q_frame[m_idx[0]]
        fk = cutlass.Int32((cutlass.Int64(n_idx[0]) * cutlass.Int64(k_div[0])) >> 32)
        hit = utils.scalar_to_ssa(allowed[fq, fk], cutlass.Int32)
        return hit == utils.scalar_to_ssa(1, cutlass.Int32)

    return lvsa_frame_mask_mulhi


def true_mask_mod():
    """A CuTe mask_mod that keeps every element (the cost of FA4's masked path alone)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def lvsa_keep_all(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        one = utils.scalar_to_ssa(1, cutlass.Int32)
        return one == one

    return lvsa_keep_all


def as_full(t):
    """``(mask_cnt, mask_idx, full_cnt, full_idx)`` with every partial tile moved to the full
    list (no tile goes through the mask_mod)."""
    cnt = t.full_cnt + t.mask_cnt
    idx = torch.cat([t.full_idx, t.mask_idx], -1)
    fw, mw = t.full_idx.shape[-1], t.mask_idx.shape[-1]
    ar = lambda w: torch.arange(w, device=cnt.device)  # noqa: E731
    valid = torch.cat([ar(fw) < t.full_cnt[..., None], ar(mw) < t.mask_cnt[..., None]], -1)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    width = max(int(cnt.max()), 1)
    full_idx = torch.gather(idx, -1, order)[..., :width].contiguous()
    return torch.zeros_like(t.mask_cnt), t.mask_idx, cnt.to(torch.int32), full_idx


def bench(shape_name, iters, device, fa, log):
    s = SHAPE_BY_NAME[shape_name]
    mask = plan_schedule(s.T, W=3, n=1, reference=s.reference).mask(0)
    q, k, v, tk, tv = make_inputs(s, torch.bfloat16, device)
    scale = s.D ** -0.5
    be = fa.FA4Backend()
    problem = Problem.from_tensors(q, k, mask, tk)
    tile = be.tile_for(problem)
    flops = 4.0 * mask.nnz() * s.P * s.P * s.D * s.heads * s.batch
    func, bst_cls, table_mod = fa.kernel()
    ref_be = plugins.backends()["reference"]
    ref = ref_be.run(ref_be.plan(mask, problem), q, k, v)          # video keys only
    rec = {"shape": s.name, "model": s.model, "T": s.T, "P": s.P, "heads": s.heads, "batch": s.batch,
           "density": mask.density(), "tile": list(tile), "variants": {}}
    outs = {}
    t = fa.tile_tables(mask, s.P, None, tile, device=q.device)
    rec["tiles"] = dict(zip(("full", "partial", "grid"), t.counts))
    table_aux = [t.q_frame, t.k_frame, t.allowed]
    for name in VARIANTS:
        lists = (t.mask_cnt, t.mask_idx, t.full_cnt, t.full_idx) if name != "nomask" else as_full(t)
        bst = bst_cls(*lists, block_size=t.tile)
        mm, aux = {"mulhi": lambda: (mulhi_mask_mod(), mulhi_aux(t, s.P)),
                   "true": lambda: (true_mask_mod(), table_aux)}.get(name, lambda: (table_mod, table_aux))()

        def call():
            return func(q, k, v, softmax_scale=scale, mask_mod=mm, aux_tensors=aux,
                        block_sparse_tensors=bst, return_lse=False)[0]

        r = {}
        if name == "mulhi" and not mulhi_exact(s.P, t.k_frame.numel()):
            r["error"] = f"not exact at P={s.P} over {t.k_frame.numel()} keys"
            rec["variants"][name] = r
            continue
        try:
            c0 = time.perf_counter()
            out = call()
            common.synchronize(q.device)
            r["first_call_s"] = round(time.perf_counter() - c0, 2)
            r["ms"] = round(common.device_time_ms(call, q.device, 2, iters), 3)
            r["tflops"] = round(flops / r["ms"] / 1e9, 1)
            r["err_vs_reference"] = rel_err(out, ref)
            if name in ("table", "mulhi"):
                outs[name] = out
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rec["variants"][name] = r
        log(f"{s.name:14s} {name:7s} " + (f"{r['ms']:9.3f} ms {r['tflops']:6.1f} TFLOP/s err {r['err_vs_reference']:.2e}"
                                          if "ms" in r else r["error"]))
    if len(outs) == 2:
        rec["mulhi_equals_table"] = bool(torch.equal(outs["table"], outs["mulhi"]))
    base = rec["variants"]["table"].get("ms")
    for r in rec["variants"].values():
        if base and "ms" in r:
            r["speed_vs_table"] = round(base / r["ms"], 4)
    if tk is not None:
        rec["text"] = text_pass(be, mask, problem, q, k, v, tk, tv, scale, iters, fa)
        log(f"{s.name:14s} text   " + json.dumps(rec["text"]))
    return rec


def text_pass(be, mask, problem, q, k, v, tk, tv, scale, iters, fa):
    """ms of the exact text merge after FA4's call, at two query tile heights, and of the
    whole fa4 call with text (as lvsa runs it)."""
    res = {}
    try:
        from lvsa_cuda.triton_backend import TEXT_CONFIG, attend_text_into

        plan = be.plan(mask, problem)
        res["fa4_with_text_ms"] = round(common.device_time_ms(
            lambda: be.run(plan, q, k, v, tk, tv, scale), q.device, 2, iters), 3)
        func, bst_cls, mod = fa.kernel()
        t = plan.tables
        bst = bst_cls(t.mask_cnt, t.mask_idx, t.full_cnt, t.full_idx, block_size=t.tile)
        aux = [t.q_frame, t.k_frame, t.allowed]
        out, lse = func(q, k, v, softmax_scale=scale, mask_mod=mod, aux_tensors=aux,
                        block_sparse_tensors=bst, return_lse=True)[:2]
        res["fa4_video_with_lse_ms"] = round(common.device_time_ms(
            lambda: func(q, k, v, softmax_scale=scale, mask_mod=mod, aux_tensors=aux,
                         block_sparse_tensors=bst, return_lse=True), q.device, 2, iters), 3)
        lse2 = (lse / fa.LN2).transpose(1, 2).contiguous()
        for cfg in ((64, 64, 8, 2), (128, 64, 8, 2), TEXT_CONFIG):   # the first two: the 11-30 A/B's
            o = out.clone()
            res["text_merge_%d_%d_%d_%d_ms" % cfg] = round(common.device_time_ms(
                lambda: attend_text_into(o, lse2, q, tk, tv, scale, config=cfg), q.device, 2, iters), 3)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def markdown(meta, records):
    lines = [f"# fa4 mask_mod A/B ({meta['device']})", "", f"Command: `{meta['command']}`", "",
             "ms (median of %d), effective TFLOP/s, speed vs `table`; `true` and `nomask` give wrong "
             "outputs on purpose (bounds)." % meta["iters"], "",
             "| shape | partial tiles | " + " | ".join(VARIANTS) + " | mulhi == table |",
             "|---|---|" + "---|" * len(VARIANTS) + "---|"]
    for rec in records:
        cells = []
        for name in VARIANTS:
            r = rec["variants"].get(name, {})
            cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f}, {r.get('speed_vs_table', 1):.3f})" if "ms" in r
                         else "error: " + r.get("error", "not run")[:60].replace("|", "/"))
        tiles = rec.get("tiles", {})
        part = tiles.get("partial", 0) / max(tiles.get("full", 0) + tiles.get("partial", 0), 1)
        lines.append(f"| {rec['shape']} | {part:.3f} | " + " | ".join(cells)
                     + f" | {rec.get('mulhi_equals_table', 'n/a')} |")
    for rec in records:
        if "text" in rec:
            lines += ["", f"Text pass at {rec['shape']}: " + ", ".join(f"{k} {v}" for k, v in rec["text"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="ab")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda")

    args = p.parse_args(argv)
    from lvsa_cuda import fa4_backend as fa

    device = torch.device(args.device)
    records = []
    for name in args.shapes:
        records.append(bench(name, args.iters, device, fa, lambda m: print(m, flush=True)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": "python3 benchmarks/fa4_mask_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "iters": args.iters, "torch": torch.__version__, "fa4": fa._fa4_version()}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"fa4-mask-ab-{args.tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(meta, records))
    print(markdown(meta, records))
    return records


if __name__ == "__main__":
    main()
