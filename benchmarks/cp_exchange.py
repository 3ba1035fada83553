"""Context-parallel communication per rank, computed from the mask (no GPU needed).

    python benchmarks/cp_exchange.py [--out benchmarks/results]

For each model shape, latent length and world size, the bytes one rank receives per
attention layer (bf16, batch 1), for:

* **ulysses**: the all-to-all of q, k, v to ``[B, S, H/w, D]`` and of the output back
  (each rank keeps ``1/w`` of what it sends);
* **sequence, all-gather** (what lvsa does): every other rank's K and V;
* **sequence, minimal**: only the K/V tokens of the frames the rank's query rows attend
  to (global frames + window halo) that it does not hold; the worst rank over every
  rotation offset of the schedule. A later optimisation, not implemented.

Writes ``cp-exchange.json`` and ``cp-exchange.md``.
"""
import argparse
import json
import os

from lvsa.parallel import exchange_sizes
from lvsa.schedule import plan_schedule

#: name -> heads, head_dim, layers, reference horizon (tokens per frame 1560 at 480x832)
MODELS = {"wan1.3b": (12, 128, 30, 21), "wan14b": (40, 128, 40, 21)}
P = 1560


def rows(models, frames, worlds):
    out = []
    for name in models:
        H, D, layers, ref = MODELS[name]
        for T in frames:
            sched = plan_schedule(T, 3, 1, ref)
            for w in worlds:
                per = [exchange_sizes(sched.mask(o), P, w, H, D) for o in range(sched.key_frame_interval)]
                worst = max(per, key=lambda r: r["minimal_bytes_max"])
                out.append({"model": name, "T": T, "world_size": w, "kfi": sched.key_frame_interval,
                            "sparsity": sched.mask(0).sparsity(), "layers": layers,
                            "ulysses_mb": worst["ulysses_bytes"] / 1e6,
                            "allgather_mb": worst["allgather_bytes"] / 1e6,
                            "minimal_mb": worst["minimal_bytes_max"] / 1e6,
                            "minimal_share_of_allgather": worst["minimal_bytes_max"] / worst["allgather_bytes"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--frames", type=int, nargs="*", default=[81, 121])
    ap.add_argument("--world-sizes", type=int, nargs="*", default=[2, 4, 8])
    args = ap.parse_args(argv)
    res = rows(args.models, args.frames, args.world_sizes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cp-exchange.json"), "w") as f:
        json.dump({"tokens_per_frame": P, "dtype": "bfloat16", "batch": 1, "W": 3, "n": 1,
                   "command": "python benchmarks/cp_exchange.py", "rows": res}, f, indent=2)
    lines = ["# Context-parallel communication per rank and attention layer (computed from the mask)", "",
             "`python benchmarks/cp_exchange.py` -- bf16, batch 1, P = 1560 (480x832), W = 3, n = 1; MB that "
             "one rank receives per attention layer (x layers for a denoising step). *minimal*: only the "
             "key frames its query rows attend (globals + window halo), worst rank over all rotation offsets.",
             "", "| model | T_lat | ranks | kfi | ulysses all-to-all | sequence all-gather K/V | minimal exchange "
             "| minimal / all-gather |", "|---|---|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['model']} | {r['T']} | {r['world_size']} | {r['kfi']} | {r['ulysses_mb']:.0f} MB | "
                     f"{r['allgather_mb']:.0f} MB | {r['minimal_mb']:.0f} MB | "
                     f"{100 * r['minimal_share_of_allgather']:.0f} % |")
    with open(os.path.join(args.out, "cp-exchange.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
