#!/usr/bin/env bash
# One device call on ONE H200 (~8 minutes), right after `bash benchmarks/verify_fa4.sh next` on
# the same warm machine (which installs FlashAttention-4 into .gpu-site/ and runs the fa4 GPU tests
# and conformance on the current code): what issue 14 and issue 12 still lack on one GPU --
#  1. `lvsa bench attention`: fa4, flashinfer, triton, flex and dense cuDNN in ONE run at every
#     T_lat >= 81 shape of Wan 1.3B, Wan 14B and HunyuanVideo 1.5 (+ text), batch 1 and 2
#     (run_bench_h200_rows.sh on 11-30 had no lvsa-flex on the device and no Wan 14B batch-2 shape);
#  2. `lvsa bench model`: dense on one GPU at Wan 14B T_lat 121 batch 2 (diffusers' own attention;
#     the 1-GPU column of the 2-GPU table) with fa4.
# Stage `attention` (second argument) runs step 1 only, with HunyuanVideo 1.5's T_lat 81 shapes with
# text (batch 1 and 2) added; stage `hy81` runs step 1 at those two shapes only; stage `text` at
# HunyuanVideo's four text shapes (T_lat 65 and 81, batch 1 and 2): attention-h200-hytext-* (11-30)
# was made by this stage's commands typed inline in the device call.
#   device run --carry .whl .gpu: bash benchmarks/run_bench_h200_next.sh [TAG] [all|attention|hy81|text]
set -uo pipefail
tag=${1:-next}
stage=${2:-all}
case "$stage" in all|attention|hy81|text) ;; *) echo "unknown stage '$stage': all, attention, hy81 or text" >&2; exit 2;; esac
shapes="wan1.3b-t81 wan1.3b-t121 wan14b-t81 hy-t65-text wan1.3b-t81-b2 hy-t65-text-b2 wan14b-t81-b2 wan1.3b-t121-b2"
[ "$stage" = attention ] && shapes="$shapes hy-t81-text hy-t81-text-b2"   # every T_lat >= 81 shape (~6 min)
[ "$stage" = hy81 ] && shapes="hy-t81-text hy-t81-text-b2"
[ "$stage" = text ] && shapes="hy-t65-text hy-t65-text-b2 hy-t81-text hy-t81-text-b2"
source benchmarks/device_setup.sh
python3 -m pip install -q --no-deps --no-build-isolation -e plugins/lvsa-flex || exit 1
source benchmarks/fa4_setup.sh
echo "[run] fa4: ${fa4:-absent}" | tee -a "$out/bench-$tag.log"
[ -f .gpu/ficache.tar.xz ] && tar -xJf .gpu/ficache.tar.xz -C /tmp
MAX_JOBS=12 timeout 200 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 >"$out/prewarm-$tag.log" 2>&1
timeout $([ "$stage" = all ] && echo 300 || echo 540) python3 -m lvsa bench attention --out "$out" --tag "$tag" --no-progress \
  --backends fa4 flashinfer triton flex --dense cudnn --flex-shapes all --iters 5 \
  --shapes $shapes 2>&1 | tail -30 | tee -a "$out/bench-$tag.log"
left=$(( 540 - ($(date +%s) - start) ))
[ "$stage" = all ] && timeout -s INT $(( left > 20 ? left : 20 )) python3 -m lvsa bench model --out "$out" --tag "$tag-1gpu" --no-progress \
  --models wan2.1-14b:121@2 --baselines diffusers --backends fa4 --warmup 1 --repeats 1 --budget-s 999 \
  2>&1 | grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\|engaged\)' | tail -12 | tee -a "$out/bench-$tag.log"
rm -f "$out"/*.png "$out"/prewarm-*
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
