# Sourced by the device-call scripts: install what .whl carries (no network) and lvsa.
#   .whl/*.whl        -> pip install --target /tmp/site (diffusers 0.42.1, …)
#   .whl/*.tar.xz     -> an installed tree extracted into /tmp/site (FlashInfer and its needs)
# then lvsa and lvsa-cuda in editable mode. NVLink multicast stays off. Sets `start` (epoch
# seconds), `out` ($OUT or benchmarks/results) and starts `$out/bench-$tag.log`.
start=$(date +%s)
out=${OUT:-benchmarks/results}
mkdir -p "$out" /tmp/site
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/ficache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/*.whl: carry .whl with the diffusers wheel" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
for t in .whl/*.tar.xz; do [ -f "$t" ] && { tar -xJf "$t" -C /tmp/site || exit 1; }; done
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda || exit 1
echo "[run] setup done after $(( $(date +%s) - start ))s" | tee "$out/bench-$tag.log"
nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total,clocks.sm,power.draw --format=csv \
  >>"$out/bench-$tag.log" 2>&1
