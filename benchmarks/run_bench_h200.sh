#!/usr/bin/env bash
# One device call on ONE H200, at most ~9 minutes of wall time: `lvsa bench model` (one
# transformer forward, real size, random weights) for Wan 2.1 1.3B (T_lat 121/81/21, batch
# 2 and 1), Wan 2.1 14B (T_lat 81), HunyuanVideo 1.5 480p (T_lat 65/33, with its text
# tokens) and CogVideoX 5B (T_lat 51 = 201 frames, the extension ratio of Wan's T_lat 81):
# diffusers' own attention, the best dense baseline and lvsa with triton and flashinfer.
#
# Installs nothing from the network. Carried in .whl (git-ignored; see benchmarks/NOTES.md):
#   .whl/diffusers-0.42.1-py3-none-any.whl   (python3 -m pip download --no-deps --only-binary=:all:
#                                            --python-version 3.12 ... diffusers==0.42.1)
#   .whl/fisite.tar.xz                       (FlashInfer 0.7.2.post1 + apache-tvm-ffi,
#                                            nvidia-cudnn-frontend, cuda-tile, as an installed tree)
# The device image has torch 2.11 (cu130), triton 3.6, transformers, matplotlib, nvidia-ml-py.
#
#   device run --carry .whl: bash benchmarks/run_bench_h200.sh [TAG]
#
# Time budget (estimates from issue 9's measurements, one timed forward where a forward
# takes > 5 s, two otherwise; one-block warm-ups): setup ~30 s; Wan 1.3B ~190 s; Wan 14B
# T81 ~105 s (dense 30 s x 2 baselines); HunyuanVideo ~90 s (diffusers' masked path 33.5 s
# at T65); CogVideoX ~30 s. FlashInfer's first-use JIT build (~80 s per head dim) runs in
# the background from the start (12 of 16 cores) and is done before its first use.
# --budget-s makes the benchmark skip rows whose estimate no longer fits (recorded as
# skipped); `timeout` stops it (results are written after every row) before the device's
# 10-minute limit.
set -uo pipefail
tag=${1:-h200}
source benchmarks/device_setup.sh

# FlashInfer's JIT builds (bf16, head_dim 128 for Wan/HunyuanVideo, 64 for CogVideoX), in the background
MAX_JOBS=12 timeout 480 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 64 >"$out/prewarm-$tag.log" 2>&1 &

left=$(( 515 - ($(date +%s) - start) ))
timeout -s INT $(( left + 15 )) python3 -m lvsa bench model --out "$out" --tag "$tag" --no-progress \
  --models wan2.1-1.3b:121,81,21@2,1 wan2.1-14b:81@1 hunyuanvideo-1.5:65,33@1 cogvideox-5b:51@1 \
  --backends triton flashinfer --warmup 1 --repeats 2 --max-time 5 --budget-s "$left" \
  2>&1 | grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\)' | tee -a "$out/bench-$tag.log"
wait
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
