"""Build a backend's kernels ahead of a benchmark (FlashInfer's first use JIT-compiles for
about 80 s per dtype/head-dim; the build is cached under ``FLASHINFER_WORKSPACE_BASE``
and guarded by a file lock, so a benchmark that reaches the backend while this runs
waits for it instead of building twice).

    MAX_JOBS=12 python -m lvsa.bench.prewarm flashinfer --head-dims 128 64 &
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def prewarm(backend: str, head_dims, dtype=torch.bfloat16, device="cuda") -> int:
    import lvsa
    from lvsa.schedule import plan_schedule

    mask = plan_schedule(6, W=1, n=1, reference=2).mask(0)
    rc = 0
    for D in head_dims:
        for text in (0, 8):
            t = time.perf_counter()
            try:
                q, k, v = (torch.randn(1, 6 * 128, 2, D, device=device, dtype=dtype) for _ in range(3))
                tk = tv = torch.randn(1, text, 2, D, device=device, dtype=dtype) if text else None
                lvsa.attention(q, k, v, mask, text_k=tk, text_v=tv, backend=backend)
                torch.cuda.synchronize()
                print(f"[prewarm] {backend} head_dim={D} text={text}: {time.perf_counter() - t:.1f}s", flush=True)
            except Exception as e:  # noqa: BLE001 - reported; the benchmark records its own errors
                print(f"[prewarm] {backend} head_dim={D} text={text} failed: {type(e).__name__}: {e}", flush=True)
                rc = 1
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend")
    ap.add_argument("--head-dims", type=int, nargs="*", default=[128])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    return prewarm(a.backend, a.head_dims, device=a.device)


if __name__ == "__main__":
    sys.exit(main())
