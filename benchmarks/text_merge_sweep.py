"""The exact text merge after a sparse call (``attend_text_into``, a Triton kernel that
continues each row's softmax over the text keys, in place): its launch configurations timed
on one GPU, every output compared with the shipped configuration's.

    python3 benchmarks/text_merge_sweep.py --tag TAG [--out DIR] [--shapes NAME ...] [--iters 10]

At HunyuanVideo 1.5 T_lat 65 + 256 text the merge took 1.12 ms of fa4's 65 ms call (the text
is ~0.2 TFLOP: ~190 TFLOP/s). Configurations are ``(block_m, block_n, warps, stages)``; the
shipped one is :data:`lvsa_cuda.triton_backend.TEXT_CONFIG`. Writes
``text-merge-sweep-DEVICE-TAG-STAMP.{json,md}`` (with lvsa bench's record: versions, git commit).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from lvsa.bench import common
from lvsa.bench.attention import SHAPE_BY_NAME, make_inputs

SHAPES = ["hy-t65-text", "hy-t81-text-b2"]
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
           if not (c[0] == 128 and c[1] == 128 and c[2] == 4)]   # 128x128 fp32 state on 4 warps: spills


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="sweep")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    from lvsa_cuda.triton_backend import TEXT_CONFIG, attend_text_into

    dev = torch.device("cuda")
    records = []
    for name in args.shapes:
        s = SHAPE_BY_NAME[name]
        q, _, _, tk, tv = make_inputs(s, torch.bfloat16, dev)
        g = torch.Generator(device=dev).manual_seed(1)
        out0 = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=g)
        lse2 = torch.randn(q.shape[:3], device=dev, dtype=torch.float32, generator=g) + 10.0
        scale = s.D ** -0.5
        want = attend_text_into(out0.clone(), lse2, q, tk, tv, scale, config=TEXT_CONFIG)
        flops = 4.0 * s.S * s.text * s.D * s.heads * s.batch
        rec = {"shape": name, "batch": s.batch, "rows": s.S, "text": s.text, "shipped": list(TEXT_CONFIG), "configs": []}
        for cfg in [TEXT_CONFIG] + [c for c in CONFIGS if c != TEXT_CONFIG]:
            r = {"config": list(cfg)}
            try:
                o = out0.clone()
                got = attend_text_into(o, lse2, q, tk, tv, scale, config=cfg)
                r["max_abs_diff_vs_shipped"] = (got.float() - want.float()).abs().max().item()
                buf = out0.clone()
                r["ms"] = round(common.device_time_ms(
                    lambda: attend_text_into(buf, lse2, q, tk, tv, scale, config=cfg), dev, 3, args.iters), 4)
                r["tflops"] = round(flops / r["ms"] / 1e9, 1)
            except Exception as e:  # noqa: BLE001 - a config that does not compile must not stop the sweep
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rec["configs"].append(r)
            print(name, r, flush=True)
        ok = [c for c in rec["configs"] if "ms" in c and c["max_abs_diff_vs_shipped"] < 2e-2]
        rec["fastest"] = min(ok, key=lambda c: c["ms"])["config"] if ok else None
        records.append(rec)
        q = tk = tv = out0 = lse2 = want = None  # freed before the next shape
        torch.cuda.empty_cache()
    meta = common.run_meta("python3 benchmarks/text_merge_sweep.py", argv, dev)
    meta["device_name"] = torch.cuda.get_device_name(dev)
    base = common.out_base(args.out, "text-merge-sweep", meta["device_before"], args.tag)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    lines = [f"# Text merge launch sweep ({meta['device_name']})", "", f"Command: `{meta['command']}`", ""]
    for rec in records:
        lines += [f"## {rec['shape']} (batch {rec['batch']}, {rec['rows']} rows, {rec['text']} text keys): "
                  f"shipped {tuple(rec['shipped'])}, fastest {tuple(rec['fastest']) if rec['fastest'] else None}", "",
                  "| block_m, block_n, warps, stages | ms | TFLOP/s | max diff vs shipped |", "|---|---|---|---|"]
        for c in sorted(rec["configs"], key=lambda c: c.get("ms", 1e9)):
            lines.append(f"| {tuple(c['config'])} | {c.get('ms', c.get('error', ''))} | {c.get('tflops', '')} | "
                         f"{c.get('max_abs_diff_vs_shipped', '')} |")
        lines.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
