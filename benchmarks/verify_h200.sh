#!/usr/bin/env bash
# A short device call that checks the committed code on the GPU (no timing targets):
# the Triton/FlashInfer tests on CUDA (default configs, ragged shapes), the benchmark's
# selfcheck plus one shape, and `lvsa generate` through diffusers on CUDA.
#   device run --carry .whl: bash benchmarks/verify_h200.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/ficache
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda -e plugins/lvsa-flex || exit 1
out=${OUT:-/tmp}
python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_flashinfer_backend.py 2>&1 | tail -5 | tee "$out/verify-pytest.txt"
python3 -m lvsa bench attention --no-progress --selfcheck --shapes wan1.3b-t81 --repeats 5 --tag verify --out "$out" 2>&1 | tee "$out/verify-bench.log" | grep -E "selfcheck|wan1.3b|->"
cd /tmp && python3 -m lvsa generate --device cuda --output-latent /tmp/tiny.pt 2>&1 | tee "$out/verify-generate.txt" | tail -12
