#!/usr/bin/env bash
# One device call on ONE H200 (~8 minutes), right after `bash benchmarks/verify_fa4.sh TAG` on the
# same warm machine (it installs FlashAttention-4 into .gpu-site/ and runs the fa4 GPU tests, FA4's
# dense forward among them): lvsa against FlashAttention-4's own dense kernel, 1.27x faster than
# cuDNN on the H200 at density 1 (benchmarks/NOTES.md), instead of PyTorch SDPA's kernels only --
#  1. `lvsa bench attention`: fa4, flashinfer and triton against dense cuDNN *and* FA4 dense
#     (`--dense cudnn fa4`: ideal = the faster of the two, named in the Markdown's notes) at every
#     T_lat >= 81 shape of Wan 1.3B, Wan 14B and HunyuanVideo 1.5 (+ 256 text), batch 1 and 2, and
#     at the full mask (wan1.3b-t21); the reference is not timed but computed once per shape for
#     the check of every output;
#  2. `lvsa bench model`: the *best dense* row with FA4's dense forward among the probed kernels
#     (the row records which won) at Wan 1.3B T_lat 21 and 81 and HunyuanVideo 1.5 T_lat 65,
#     batch 1, beside fa4; diffusers' own attention for these rows is in committed files
#     (`--baselines dense`; `lvsa bench report` merges it).
# Work stays under 540 s (each step bounded by what is left); PNGs are deleted: 5 files come back.
#   device run --carry .whl .gpu: bash benchmarks/run_bench_h200_fa4dense.sh [TAG]
set -uo pipefail
tag=${1:-fa4dense}
source benchmarks/device_setup.sh
source benchmarks/fa4_setup.sh
[ -n "$fa4" ] || { echo "[run] no FlashAttention-4 in $site: run benchmarks/verify_fa4.sh first on this machine" | tee -a "$out/bench-$tag.log"; exit 2; }
[ -f .gpu/ficache.tar.xz ] && tar -xJf .gpu/ficache.tar.xz -C /tmp
MAX_JOBS=12 timeout 150 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 >"$out/prewarm-$tag.log" 2>&1
# the attention run gets what is left but ~170 s, which the model rows need
left=$(( 540 - 170 - ($(date +%s) - start) ))
timeout -s INT $(( left > 60 ? left + 15 : 75 )) python3 -m lvsa bench attention --out "$out" --tag "$tag" \
  --no-progress --backends fa4 flashinfer triton --dense cudnn fa4 --iters 5 --budget-s $(( left > 60 ? left : 60 )) \
  --shapes wan1.3b-t81 wan14b-t81 hy-t65-text wan1.3b-t81-b2 hy-t65-text-b2 wan1.3b-t121 wan1.3b-t21 \
           wan14b-t81-b2 wan1.3b-t121-b2 \
  2>&1 | tail -40 | tee -a "$out/bench-$tag.log"
left=$(( 540 - ($(date +%s) - start) ))
timeout -s INT $(( left > 20 ? left : 20 )) python3 -m lvsa bench model --out "$out" --tag "$tag" --no-progress \
  --models wan2.1-1.3b:21,81@1 hunyuanvideo-1.5:65@1 --baselines dense --backends fa4 --warmup 1 --repeats 2 \
  --max-time 5 --budget-s $(( left > 30 ? left - 10 : 20 )) \
  2>&1 | grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\|engaged\)' | tail -24 | tee -a "$out/bench-$tag.log"
rm -f "$out"/*.png "$out"/prewarm-*
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
