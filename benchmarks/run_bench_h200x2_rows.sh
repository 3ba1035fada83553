#!/usr/bin/env bash
# One device call on TWO H200s (kind nvidia-h200-x2), ~9 minutes: the rows of issue 12's
# scaling table that run_bench_h200x2.sh left out (its results: model-h200-h200x2-*.json), each
# a separate results file that `lvsa bench report` merges with it:
#  1. dense on ONE GPU at T_lat 121 (diffusers' own attention; GPU 0 alone), with flashinfer;
#  2. the reference backend on 2 GPUs at T_lat 121 and 81, batch 1 (its 1-GPU time on rank 0);
#  3. Wan 14B T_lat 121 batch 2 on 2 GPUs: diffusers' Ulysses dense vs flashinfer and triton
#     (1-GPU times on rank 0), last because it is the longest; --budget-s skips what no longer fits.
#   device run --kind nvidia-h200-x2 --carry .whl .gpu: bash benchmarks/run_bench_h200x2_rows.sh [TAG]
set -uo pipefail
tag=${1:-x2rows}
source benchmarks/device_setup.sh
[ -f .gpu/ficache.tar.xz ] && tar -xJf .gpu/ficache.tar.xz -C /tmp
MAX_JOBS=24 timeout 200 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 >"$out/prewarm-$tag.log" 2>&1
filter() { grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\|engaged\)' | tee -a "$out/bench-$tag.log"; }
left() { echo $(( 560 - ($(date +%s) - start) )); }
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m lvsa bench model --out "$out" --tag "$tag-1gpu" --no-progress \
  --models wan2.1-14b:121@1 --baselines diffusers --backends flashinfer --warmup 1 --repeats 1 2>&1 | filter
l=$(left); timeout -s INT $(( l > 20 ? l : 20 )) python3 -m lvsa bench model --world-size 2 --out "$out" --tag "$tag-ref" \
  --no-progress --models wan2.1-14b:121,81@1 --baselines none --backends reference --warmup 1 --repeats 1 \
  --budget-s "$l" 2>&1 | filter
l=$(left); timeout -s INT $(( l > 20 ? l : 20 )) python3 -m lvsa bench model --world-size 2 --out "$out" --tag "$tag-b2" \
  --no-progress --models wan2.1-14b:121@2 --baselines diffusers --backends flashinfer triton --warmup 1 --repeats 1 \
  --budget-s "$l" 2>&1 | filter
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
