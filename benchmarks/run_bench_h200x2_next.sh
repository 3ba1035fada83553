#!/usr/bin/env bash
# One device call on TWO H200s (kind nvidia-h200-x2), ~9 minutes: the rows of issue 12's
# scaling table still missing, each its own results file that `lvsa bench report` merges
# with model-h200-h200x2-*.json and model-h200-x2rows-*.json (run_bench_h200x2_rows.sh, 11-30):
#  1. Wan 14B T_lat 121 batch 2 on 2 GPUs, diffusers' Ulysses dense vs flashinfer and triton,
#     with the NCCL share (the 11-30 row ran flashinfer alone, without the profiler, and before
#     the context-parallel memory fix: its 55.9 vs 48.6 GiB should now read ~48.6);
#  2. the reference on 2 GPUs at T_lat 121 batch 2 and T_lat 81 batch 1;
# first, cp_check (2 ranks vs 1, Ulysses and sequence mode, a real-size Wan 1.3B forward at batch 2):
# the exchange was rewritten for memory after the last NCCL check.
# (~520 s. Dense on ONE GPU at T_lat 121 batch 2 -- diffusers' own, ~125 s -- does not fit here:
# it is the last step of run_bench_h200_next.sh on one H200.)
# The first call (11-30) skipped row 1 on the bench's own time estimate (380 s for ~300 s of work)
# and lost a file to the device's 8-files limit: --budget-s is set high (timeout bounds the call)
# and the plots are deleted before the call ends (the JSON and Markdown come back).
# When run_cp_fa4_x2.sh ran just before on the same warm machine, FlashAttention-4 is in
# .gpu-site/ and fa4 joins the transformer check and the model rows. Stage `ref` (a third call,
# same machine) runs only row 2: the main stage fills the 600-s call with fa4 in it. Stage `rest`
# (needs fa4): fa4 at T_lat 81 batch 1 and 2 and T_lat 121 batch 1, the reference at T_lat 81 batch 2.
#   device run --kind nvidia-h200-x2 --carry .whl .gpu: bash benchmarks/run_bench_h200x2_next.sh [TAG] [main|ref|rest]
set -uo pipefail
tag=${1:-x2rows2}
stage=${2:-main}
source benchmarks/device_setup.sh
source benchmarks/fa4_setup.sh
case "$stage" in main|ref|rest) ;; *) echo "unknown stage '$stage': main, ref or rest" >&2; exit 2;; esac
echo "[run] stage $stage, fa4: ${fa4:-absent}" | tee -a "$out/bench-$tag.log"
[ -f .gpu/ficache.tar.xz ] && tar -xJf .gpu/ficache.tar.xz -C /tmp
MAX_JOBS=24 timeout 200 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 >"$out/prewarm-$tag.log" 2>&1
filter() { grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\|engaged\)' | grep -v Warn | tee -a "$out/bench-$tag.log" | tail -15; }
left() { echo $(( 570 - ($(date +%s) - start) )); }
if [ "$stage" = main ]; then
  # the context-parallel exchange changed (memory fix): 2 ranks vs 1 through a real Wan 1.3B forward at batch 2
  timeout 150 torchrun --nproc-per-node 2 benchmarks/cp_check.py --shapes wan1.3b-t81 --backends flashinfer $fa4 \
    --transformer wan1.3b --batch 2 --out "$out" --tag "$tag" 2>&1 | grep -E "^  |cp_check|rank" | tail -12 \
    | tee -a "$out/bench-$tag.log"
  l=$(left); timeout -s INT $(( l > 20 ? l : 20 )) python3 -m lvsa bench model --world-size 2 --out "$out" \
    --tag "$tag-b2" --no-progress --models wan2.1-14b:121@2 --baselines diffusers --backends $fa4 flashinfer triton \
    --warmup 1 --repeats 1 --budget-s 999 2>&1 | filter
elif [ "$stage" = ref ]; then
  l=$(left); timeout -s INT $(( l > 20 ? l : 20 )) python3 -m lvsa bench model --world-size 2 --out "$out" \
    --tag "$tag-ref" --no-progress --models wan2.1-14b:121@2 wan2.1-14b:81@1 --baselines none --backends reference \
    --warmup 1 --repeats 1 --budget-s 999 2>&1 | filter
else  # rest: the cells the 11-30 calls left (fa4 at T_lat 81 b1/b2 and 121 b1; the reference at 81 b2)
  [ -n "$fa4" ] || { echo "[run] stage rest needs fa4: run run_cp_fa4_x2.sh first on this machine" | tee -a "$out/bench-$tag.log"; exit 2; }
  timeout -s INT 330 python3 -m lvsa bench model --world-size 2 --out "$out" --tag "$tag-fa4" --no-progress \
    --models wan2.1-14b:81@1,2 wan2.1-14b:121@1 --baselines none --backends fa4 \
    --warmup 1 --repeats 1 --budget-s 999 2>&1 | filter
  l=$(left); timeout -s INT $(( l > 20 ? l : 20 )) python3 -m lvsa bench model --world-size 2 --out "$out" \
    --tag "$tag-ref81" --no-progress --models wan2.1-14b:81@2 --baselines none --backends reference \
    --warmup 1 --repeats 1 --budget-s 999 2>&1 | filter
fi
rm -f "$out"/*.png "$out"/prewarm-*
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
