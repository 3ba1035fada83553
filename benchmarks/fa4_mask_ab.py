"""What the fa4 backend's partial tiles cost, and which mask_mod to ship: an A/B on one GPU.

    python3 benchmarks/fa4_mask_ab.py --tag TAG [--out DIR] [--shapes NAME ...] [--variants K ...] [--iters 5]

FA4 runs a tile cut by a frame boundary (a *partial* tile, ~10 % of the tiles at Wan's
T_lat 81) through lvsa's ``mask_mod`` element by element; every other tile runs unmasked.
Per shape (``lvsa bench attention``'s presets, the video keys only; the text pass is timed
on its own) this times FA4's block-sparse forward several ways:

- ``table``   the first mask_mod: it loads the query row's frame, the key's frame and the
              frame mask (three dependent loads);
- ``div``     the backend's mask_mod (``fa4_backend.MASK_KIND``): both frames by unsigned
              division by the compile-time constant ``P``, one load of the frame mask;
- ``divs``    the same with signed division (Python's floor ``//`` on an Int32: more
              instructions). In ``fa4-mask-ab-div-*`` (11-30) the backend's ``div`` was
              still the signed one and ``divu`` the unsigned: 0.97-1.02x and 1.01-1.03x
              ``table``, so the unsigned one ships;
- ``mulhi``   the 11-30 candidate (not run by default; measured 0.94-1.005x ``table``): the
              key's frame as a 64-bit multiply-high by a loaded multiplier;
- ``true``    a mask_mod that returns True: FA4's masked path without lvsa's work (the
              output is wrong: a bound, not a candidate);
- ``nomask``  the partial tiles listed as full tiles (each row's list ascending, as the
              backend's): no masked path at all (wrong output: the bound of any mask_mod;
              before 11-30's fourth session the merged lists were not kept ascending).

The real kinds are checked against the reference backend (relative L2) and against ``table``
(same arithmetic: they must agree bit for bit). Where the shape has text, the text pass times
the whole ``fa4`` call with text under each real kind, FA4's call with the LSE, the exact text
merge that follows it (``attend_text_into``, a Triton kernel) at three launch configurations,
``joint`` (the text keys appended to K/V as FA4 key tiles: one call, no merge; ``joint_cat``
with the concatenation) and, at batch > 1, ``per_batch`` (one batch-1 call per element).
Writes ``fa4-mask-ab-DEVICE-TAG-STAMP.{json,md}`` (``lvsa bench``'s record: versions, git
commit, fa4's shipped mask_mod kind; files of 11-30 and before are ``fa4-mask-ab-TAG-STAMP``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch

from lvsa import plugins
from lvsa.backend import Problem
from lvsa.bench import common
from lvsa.bench.attention import SHAPE_BY_NAME, make_inputs, rel_err
from lvsa.schedule import plan_schedule

VARIANTS = ("table", "div", "divs", "true", "nomask")
ALL_VARIANTS = VARIANTS + ("mulhi",)
#: the kinds with a correct output, compared bit for bit with ``table``
REAL = ("table", "div", "divs", "mulhi")
SHAPES = ["hy-t81-text-b2", "wan1.3b-t81", "hy-t81-text", "wan14b-t81", "wan1.3b-t121"]


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


@functools.lru_cache(maxsize=None)
def divs_mask_mod(P: int, r: int = 0):
    """The ``divs`` candidate in CuTe: the backend's ``div`` with signed (floor) division."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def lvsa_frame_mask_divs(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        allowed = aux_tensors[0]
        fq = (m_idx[0] + r) // P
        fk = n_idx[0] // P
        hit = utils.scalar_to_ssa(allowed[fq, fk], cutlass.Int32)
        return hit == utils.scalar_to_ssa(1, cutlass.Int32)

    return lvsa_frame_mask_divs


def joint_tables(t, S: int, L: int):
    """The tables with ``L`` text keys appended after the ``S`` video keys as FA4 key tiles:
    ``(mask_cnt, mask_idx, full_cnt, full_idx, allowed_div)``. Every query attends every text
    key: the tile holding both video and text keys becomes partial (the ``div`` mask_mod reads
    the text's frames, ``T`` on, as attended), the text-only tiles full."""
    from lvsa_cuda.fa4_backend import _stable_partition

    tn = t.tile[1]
    M = t.full_cnt.shape[-1]
    n_old, n_new = -(-S // tn), -(-(S + L) // tn)
    dev = t.full_cnt.device

    def members(cnt, idx):
        ar = torch.arange(idx.shape[-1], device=dev)
        cols = torch.where(ar < cnt[0, 0, :, None], idx[0, 0].long(), n_new)
        return torch.zeros(M, n_new + 1, dtype=torch.bool, device=dev).scatter_(1, cols, True)[:, :n_new]

    full, part = members(t.full_cnt, t.full_idx), members(t.mask_cnt, t.mask_idx)
    if S % tn:
        full[:, S // tn] = False
        part[:, S // tn] = True
    full[:, n_old:] = True
    out = []
    for flag in (part, full):
        cnt, order = _stable_partition(flag)
        width = max(int(cnt.max()), 1)
        out += [cnt.to(torch.int32)[None, None], order[:, :width].to(torch.int32)[None, None].contiguous()]
    T = t.allowed.shape[0]
    allowed = torch.zeros(t.allowed_div.shape[0], (n_new * tn - 1) // t.P + 1, dtype=torch.int32, device=dev)
    allowed[:, :t.allowed_div.shape[1]] = t.allowed_div
    allowed[:, T:] = 1
    return (*out, allowed)


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
    list (no tile goes through the mask_mod), each row ascending as the backend's lists are
    (FA4 runs a row from its end and seqlen-masks the first tile it runs)."""
    cnt = t.full_cnt + t.mask_cnt
    idx = torch.cat([t.full_idx, t.mask_idx], -1)
    fw, mw = t.full_idx.shape[-1], t.mask_idx.shape[-1]
    ar = lambda w: torch.arange(w, device=cnt.device)  # noqa: E731
    valid = torch.cat([ar(fw) < t.full_cnt[..., None], ar(mw) < t.mask_cnt[..., None]], -1)
    big = torch.iinfo(torch.int32).max
    keyed = torch.where(valid, idx, torch.full_like(idx, big))
    width = max(int(cnt.max()), 1)
    full_idx = torch.sort(keyed, dim=-1).values[..., :width]
    full_idx = torch.where(full_idx == big, torch.zeros_like(full_idx), full_idx).contiguous()
    return torch.zeros_like(t.mask_cnt), t.mask_idx, cnt.to(torch.int32), full_idx


def bench(shape_name, iters, device, fa, log, variants=VARIANTS):
    s = SHAPE_BY_NAME[shape_name]
    mask = plan_schedule(s.T, W=3, n=1, reference=s.reference).mask(0)
    q, k, v, tk, tv = make_inputs(s, torch.bfloat16, device)
    scale = s.D ** -0.5
    be = fa.FA4Backend()
    problem = Problem.from_tensors(q, k, mask, tk)
    tile = be.tile_for(problem)
    flops = 4.0 * mask.nnz() * s.P * s.P * s.D * s.heads * s.batch
    func, bst_cls, mods = fa.kernel()
    ref_be = plugins.backends()["reference"]
    ref = ref_be.run(ref_be.plan(mask, problem), q, k, v)          # video keys only
    rec = {"shape": s.name, "model": s.model, "T": s.T, "P": s.P, "heads": s.heads, "batch": s.batch,
           "density": mask.density(), "tile": list(tile), "variants": {}}
    outs = {}
    t = fa.tile_tables(mask, s.P, None, tile, device=q.device)
    rec["tiles"] = dict(zip(("full", "partial", "grid"), t.counts))
    for name in variants:
        lists = (t.mask_cnt, t.mask_idx, t.full_cnt, t.full_idx) if name != "nomask" else as_full(t)
        bst = bst_cls(*lists, block_size=t.tile)
        mm, aux = {"mulhi": lambda: (mulhi_mask_mod(), mulhi_aux(t, s.P)),
                   "div": lambda: (mods("div", t.P, t.r), t.aux("div")),
                   "divs": lambda: (divs_mask_mod(t.P, t.r), t.aux("div")),
                   "true": lambda: (true_mask_mod(), t.aux("table"))}.get(
            name, lambda: (mods("table"), t.aux("table")))()

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
            if name in REAL:
                outs[name] = out
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rec["variants"][name] = r
        log(f"{s.name:14s} {name:7s} " + (f"{r['ms']:9.3f} ms {r['tflops']:6.1f} TFLOP/s err {r['err_vs_reference']:.2e}"
                                          if "ms" in r else r["error"]))
    if "table" in outs:
        rec["equals_table"] = {n: bool(torch.equal(outs["table"], o)) for n, o in outs.items() if n != "table"}
    base = rec["variants"].get("table", {}).get("ms")
    for r in rec["variants"].values():
        if base and "ms" in r:
            r["speed_vs_table"] = round(base / r["ms"], 4)
    del outs, ref
    if tk is not None:
        rec["text"] = text_pass(be, mask, problem, q, k, v, tk, tv, scale, iters, fa)
        log(f"{s.name:14s} text   " + json.dumps(rec["text"]))
    return rec


def text_pass(be, mask, problem, q, k, v, tk, tv, scale, iters, fa):
    """ms of the whole fa4 call with text (as lvsa runs it) under each real mask_mod kind, of
    FA4's call with the LSE, of the exact text merge after it at three launches, of ``joint``
    (text keys as FA4 key tiles; ``joint_cat`` with the concatenation) and, at batch > 1, of
    ``per_batch``; errors of the whole outputs against the reference."""
    res = {}
    dev = q.device
    timed = lambda fn: round(common.device_time_ms(fn, dev, 2, iters), 3)  # noqa: E731
    try:
        from lvsa_cuda.triton_backend import TEXT_CONFIG, attend_text_into

        ref_be = plugins.backends()["reference"]
        ref = ref_be.run(ref_be.plan(mask, problem), q, k, v, tk, tv)
        plan = be.plan(mask, problem)
        shipped = fa.MASK_KIND
        for kind in fa.MASK_KINDS:
            fa.MASK_KIND = kind
            try:
                res[f"fa4_with_text_{kind}_ms"] = timed(lambda: be.run(plan, q, k, v, tk, tv, scale))
                res[f"fa4_with_text_{kind}_err"] = rel_err(be.run(plan, q, k, v, tk, tv, scale), ref)
            finally:
                fa.MASK_KIND = shipped
        func, bst_cls, mods = fa.kernel()
        t = plan.tables
        bst = bst_cls(t.mask_cnt, t.mask_idx, t.full_cnt, t.full_idx, block_size=t.tile)
        mod, aux = mods(shipped, t.P, t.r), t.aux(shipped)
        video = lambda: func(q, k, v, softmax_scale=scale, mask_mod=mod, aux_tensors=aux,  # noqa: E731
                             block_sparse_tensors=bst, return_lse=True)
        out, lse = video()[:2]
        res["fa4_video_with_lse_ms"] = timed(video)
        lse2 = (lse / fa.LN2).transpose(1, 2).contiguous()
        for cfg in ((64, 64, 8, 2), (128, 64, 8, 2), TEXT_CONFIG):   # the first two: the 11-30 A/B's
            o = out.clone()
            res["text_merge_%d_%d_%d_%d_ms" % cfg] = timed(
                lambda: attend_text_into(o, lse2, q, tk, tv, scale, config=cfg))
        del out, lse, lse2, o
        S, L = k.shape[1], tk.shape[1]
        res["joint_cat_only_ms"] = timed(lambda: (torch.cat([k, tk], 1), torch.cat([v, tv], 1)))
        kj, vj = torch.cat([k, tk], 1), torch.cat([v, tv], 1)
        *lists, allowed = joint_tables(t, S, L)
        bst_j = bst_cls(*lists, block_size=t.tile)
        mod_j = mods("div", t.P, 0)
        joint = lambda kk, vv: func(q, kk, vv, softmax_scale=scale, mask_mod=mod_j,  # noqa: E731
                                    aux_tensors=[allowed], block_sparse_tensors=bst_j, return_lse=False)[0]
        res["joint_ms"] = timed(lambda: joint(kj, vj))
        res["joint_err"] = rel_err(joint(kj, vj), ref)
        del kj, vj
        res["joint_cat_ms"] = timed(lambda: joint(torch.cat([k, tk], 1), torch.cat([v, tv], 1)))
        if q.shape[0] > 1:
            one = Problem.from_tensors(q[:1], k[:1], mask, tk[:1])
            plan1 = be.plan(mask, one)
            per = lambda: [be.run(plan1, q[b:b + 1], k[b:b + 1], v[b:b + 1], tk[b:b + 1], tv[b:b + 1], scale)  # noqa: E731
                           for b in range(q.shape[0])]
            res["per_batch_ms"] = timed(per)
            res["per_batch_err"] = rel_err(torch.cat(per(), 0), ref)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def markdown(meta, records):
    lines = [f"# fa4 mask_mod A/B ({meta['device_name']})", "", f"Command: `{meta['command']}`", "",
             "ms (median of %d), effective TFLOP/s, speed vs `table`; `true` and `nomask` give wrong "
             "outputs on purpose (bounds)." % meta["iters"], "",
             "| shape | partial tiles | " + " | ".join(meta["variants"]) + " | == table |",
             "|---|---|" + "---|" * len(meta["variants"]) + "---|"]
    for rec in records:
        cells = []
        for name in meta["variants"]:
            r = rec["variants"].get(name, {})
            cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f}, {r.get('speed_vs_table', 1):.3f})" if "ms" in r
                         else "error: " + r.get("error", "not run")[:60].replace("|", "/"))
        tiles = rec.get("tiles", {})
        part = tiles.get("partial", 0) / max(tiles.get("full", 0) + tiles.get("partial", 0), 1)
        lines.append(f"| {rec['shape']} | {part:.3f} | " + " | ".join(cells)
                     + f" | {', '.join(f'{n} {e}' for n, e in rec.get('equals_table', {}).items()) or 'n/a'} |")
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
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--device", default="cuda")

    args = p.parse_args(argv)
    from lvsa_cuda import fa4_backend as fa

    device = torch.device(args.device)
    # versions (flash-attn-4 among them), the git commit and fa4's shipped mask_mod kind: lvsa bench's record
    meta = common.run_meta("python3 benchmarks/fa4_mask_ab.py", argv, device)
    meta.update(device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                iters=args.iters, variants=args.variants)
    base = common.out_base(args.out, "fa4-mask-ab", meta["device_before"], args.tag)
    records = []
    for name in args.shapes:
        records.append(bench(name, args.iters, device, fa, lambda m: print(m, flush=True), args.variants))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # written after every shape: a device call cut short keeps what it measured
        with open(base + ".json", "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(meta, records))
    print(markdown(meta, records))
    return records


if __name__ == "__main__":
    main()
