#!/usr/bin/env bash
# One device call on ONE H200 (~9 minutes), right after benchmarks/verify_fa4.sh on the same
# warm machine (its .gpu-site/ holds FlashAttention-4; without it the fa4 rows say why not):
#  1. `lvsa bench attention`: fa4, flashinfer, triton, flex (one shape) and dense cuDNN in one run
#     at the T_lat >= 81 shapes of Wan 1.3B, Wan 14B and HunyuanVideo 1.5 (+ text), batch 1 and 2
#     (issue 14's comparison);
#  2. `lvsa bench model`: the rows issue 9 still lacked -- HunyuanVideo 1.5 T_lat 65 batch 2 and 1,
#     Wan 14B T_lat 81 batch 2, CogVideoX 5B T_lat 51 batch 2 -- with fa4 and flashinfer.
#   device run --carry .whl: bash benchmarks/run_bench_h200_rows.sh [TAG]
set -uo pipefail
tag=${1:-rows}
source benchmarks/device_setup.sh
site=$PWD/.gpu-site
[ -d "$site/flash_attn" ] && export PYTHONPATH=$PYTHONPATH:$site:$site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute" 2>&1 | tail -1 | sed 's/^/[run] fa4 import: /' | tee -a "$out/bench-$tag.log"
MAX_JOBS=12 timeout 300 python3 -m lvsa.bench.prewarm flashinfer --head-dims 128 64 >"$out/prewarm-$tag.log" 2>&1 &
pw=$!
# fa4/triton/dense compile in seconds: time them while FlashInfer builds, flashinfer last
timeout 200 python3 -m lvsa bench attention --out "$out" --tag "$tag" --no-progress \
  --backends fa4 triton flex flashinfer --dense cudnn --flex-shapes wan1.3b-t81 --iters 5 \
  --shapes wan1.3b-t81 wan1.3b-t121 wan14b-t81 hy-t65-text wan1.3b-t81-b2 hy-t65-text-b2 wan1.3b-t21 \
  2>&1 | tail -30 | tee -a "$out/bench-$tag.log"
wait $pw
left=$(( 530 - ($(date +%s) - start) ))
timeout -s INT $(( left + 15 )) python3 -m lvsa bench model --out "$out" --tag "$tag" --no-progress \
  --models hunyuanvideo-1.5:65@2,1 cogvideox-5b:51@2 wan2.1-14b:81@2 \
  --backends fa4 flashinfer --warmup 1 --repeats 1 --budget-s "$left" \
  2>&1 | grep -v '^\[LVSA\] \(reference_latent\|computed\|kfi=\)' | tee -a "$out/bench-$tag.log"
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
