#!/usr/bin/env bash
# One device call on TWO H200s (kind nvidia-h200-x2), at most ~9 minutes: `lvsa bench model
# --world-size 2` for Wan 2.1 14B (issue 12's scaling rows): diffusers' Ulysses context
# parallelism (dense) vs lvsa with context parallelism (flashinfer, triton) on 2 GPUs, the
# 1-GPU lvsa times measured on rank 0 in the same run (speedup, parallel efficiency), the
# NCCL share of an lvsa step (torch.profiler) and every GPU's peak memory (NVML).
# Needs lvsa's context parallelism (issue 11) on the branch; carried: .whl as in
# run_bench_h200.sh. NVLink multicast stays off.
#
#   device run --kind nvidia-h200-x2 --carry .whl: bash benchmarks/run_bench_h200x2.sh [TAG]
#
# Rows by priority (T_lat 121 batch 1 first: the efficiency target; then 81: the 2.1x target;
# batch 2 last); --budget-s skips what no longer fits, `timeout` ends it before 10 minutes.
set -uo pipefail
tag=${1:-h200x2}
source benchmarks/device_setup.sh
nvidia-smi topo -m >>"$out/bench-$tag.log" 2>&1
# FlashInfer's JIT build in the background (file-locked: the ranks wait for it, then load it from the cache)
MAX_JOBS=24 timeout 400 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 >"$out/prewarm-$tag.log" 2>&1 &
left=$(( 515 - ($(date +%s) - start) ))
timeout -s INT $(( left + 15 )) python3 -m lvsa bench model --world-size 2 --out "$out" --tag "$tag" --no-progress \
  --models wan2.1-14b:121,81@1 wan2.1-14b:121,81@2 \
  --backends flashinfer triton --warmup 1 --repeats 1 --budget-s "$left" \
  2>&1 | grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\)' | tee -a "$out/bench-$tag.log"
wait
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
