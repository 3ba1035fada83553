#!/usr/bin/env bash
# A short verification call on TWO H200s (kind nvidia-h200-x2) of the merged code, no
# timing targets: the CUDA backend tests, cp_check at the attention shapes (Ulysses and
# sequence mode on 2 ranks vs 1, timed after a warm call), and the CogVideoX 5B row of
# `lvsa bench model` with flashinfer (it failed in the 'final' run: K/V strides).
#   device run --kind nvidia-h200-x2 --carry .whl [.gpu]: bash benchmarks/verify_h200x2.sh [TAG]
# (.gpu/ficache.tar.xz, if carried: FlashInfer's JIT cache from an earlier call, extracted to
# /tmp/ficache so the head_dim 128 kernel is not rebuilt)
set -uo pipefail
tag=${1:-verify2}
source benchmarks/device_setup.sh
[ -f .gpu/ficache.tar.xz ] && tar -xJf .gpu/ficache.tar.xz -C /tmp
MAX_JOBS=24 timeout 200 python3 -m lvsa.bench.prewarm flashinfer --head-dims 64 128 >"$out/prewarm-$tag.log" 2>&1 &
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_flashinfer_backend.py \
  2>&1 | tail -4 | tee "$out/verify-pytest-$tag.txt"
timeout 100 torchrun --nproc-per-node 2 benchmarks/cp_check.py --transformer none --time 3 --out "$out" --tag "$tag" \
  2>&1 | grep -E "^  |cp_check" | tee -a "$out/bench-$tag.log"
wait
timeout 100 python3 -m lvsa bench model --out "$out" --tag "$tag-cogvideox" --no-progress \
  --models cogvideox-5b:51@1 --backends flashinfer --warmup 1 --repeats 1 \
  2>&1 | grep -E "^  |^\| CogVideoX|Errors|error" | tee -a "$out/bench-$tag.log"
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$out/bench-$tag.log"
