#!/usr/bin/env bash
# One device call on ONE H200: FlashAttention-4 (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1
# cu13) as lvsa's `fa4` backend -- set-up, its GPU tests and conformance against float64, then
# the attention benchmark beside triton, the reference and dense cuDNN at T_lat >= 81.
#
# Carried (git-ignored): .fa4/fa4site.tar.xz, an installed tree of flash-attn-4, nvidia-cutlass-dsl
# (+ libs-base, libs-core, libs-cu13), quack-kernels, torch-c-dlpack-ext, einops, apache-tvm-ffi
# (pip download --python-version 3.12 --only-binary=:all:, unzipped; benchmarks/NOTES.md). It is
# extracted into .gpu-site/ (git-ignored), which the device keeps for the next call while warm.
# Second argument `ab`: instead of the attention benchmark, the mask_mod A/B (benchmarks/fa4_mask_ab.py);
# `tests`: no benchmark (the GPU tests and conformance only). `t21`: no tests; `lvsa warmup` of fa4
# for the Wan, HunyuanVideo and CogVideoX presets (their P), then fa4 beside cuDNN at wan1.3b-t21
# (a full mask) with its output checked against the reference.
#   device run --carry .fa4: bash benchmarks/verify_fa4.sh [TAG] [bench|ab|tests|t21]
set -uo pipefail
tag=${1:-fa4}
stage=${2:-bench}
case "$stage" in bench|ab|tests|t21) ;; *) echo "unknown stage '$stage': bench, ab, tests or t21" >&2; exit 2;; esac
start=$(date +%s)
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source benchmarks/fa4_setup.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda || exit 1
log="$out/verify-fa4-$tag.txt"
echo "[run] setup done after $(( $(date +%s) - start ))s" | tee "$log"
python3 - <<'PY' 2>&1 | tee -a "$log"
import importlib.metadata as md, torch
for d in ("flash-attn-4", "nvidia-cutlass-dsl", "cuda-bindings", "apache-tvm-ffi", "torch", "triton"):
    try: print(f"{d} {md.version(d)}")
    except Exception as e: print(f"{d}: {e}")
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
import flash_attn.cute  # noqa: F401
print("flash_attn.cute imports")
PY
t0=$(date +%s)
if [ "$stage" != t21 ]; then
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_fa4_backend.py -k "real_kernel or on_each_device" 2>&1 | tail -15 | tee -a "$log"
echo "[run] GPU tests (incl. FA4 compiles) $(( $(date +%s) - t0 ))s" | tee -a "$log"
timeout 120 python3 -m lvsa.testing fa4 --device cuda 2>&1 | tail -30 | tee -a "$log"
fi
left=$(( 540 - ($(date +%s) - start) ))
if [ "$stage" = t21 ]; then
  timeout 200 python3 -m lvsa warmup --backends fa4 --model wan2.1-t2v-1.3b hunyuanvideo-1.5 cogvideox-5b 2>&1 \
    | grep -v Warning | tail -12 | tee -a "$log"
  timeout 200 python3 -m lvsa bench attention --out "$out" --tag "$tag" --no-progress --backends fa4 \
    --dense cudnn --iters 5 --shapes wan1.3b-t21 2>&1 | tail -14 | tee -a "$log"
elif [ "$stage" = tests ]; then
  :   # the GPU tests and conformance only (the one attention run follows in run_bench_h200_next.sh)
elif [ "$stage" = ab ]; then
  timeout -s INT $(( left + 10 )) python3 benchmarks/fa4_mask_ab.py --tag "$tag" --out "$out" 2>&1 | grep -v Warning | tail -30 | tee -a "$log"
else
timeout -s INT $(( left + 10 )) python3 -m lvsa bench attention --out "$out" --tag "$tag" --no-progress \
  --backends fa4 triton reference --dense cudnn --flex-shapes none --iters 5 --budget-s "$left" \
  --shapes wan1.3b-t81 wan1.3b-t121 wan14b-t81 hy-t65-text wan1.3b-t81-b2 hy-t65-text-b2 2>&1 | tail -40 | tee -a "$log"
fi
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$log"
