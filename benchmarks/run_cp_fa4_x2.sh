#!/usr/bin/env bash
# One device call on TWO H200s (kind nvidia-h200-x2), ~2 minutes: the fa4 backend (FlashAttention-4,
# the first choice of `auto` on Hopper) split over 2 ranks on NCCL -- Ulysses and sequence mode
# against one rank -- at the Wan 1.3B T_lat 81 and HunyuanVideo 1.5 T_lat 65 + 256 text attention
# shapes (issue 12 named flashinfer, triton and the reference, checked on 11-29; fa4 came after).
# Carries .fa4 (as verify_fa4.sh); it is extracted into .gpu-site/, which the warm machine keeps
# for the next call: run_bench_h200x2_next.sh then adds fa4 to its transformer check and model rows.
#   device run --kind nvidia-h200-x2 --carry .fa4: bash benchmarks/run_cp_fa4_x2.sh [TAG]
set -uo pipefail
tag=${1:-x2fa4}
start=$(date +%s)
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source benchmarks/fa4_setup.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda || exit 1
log="$out/bench-$tag.log"
echo "[run] setup done after $(( $(date +%s) - start ))s" | tee "$log"
nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv >>"$log" 2>&1
timeout 400 torchrun --nproc-per-node 2 benchmarks/cp_check.py --shapes wan1.3b-t81 hy1.5-t65-text256 \
  --backends fa4 --transformer none --time 3 --out "$out" --tag "$tag" 2>&1 \
  | grep -v Warning | tail -25 | tee -a "$log"
echo "[run] total $(( $(date +%s) - start ))s" | tee -a "$log"
