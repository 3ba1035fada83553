#!/usr/bin/env bash
# One device call on the H200: install the carried wheels (.whl: flashinfer-python 0.7.2.post1
# and its needs) and lvsa's distributions, show what lvsa selects, then run the benchmark.
#   device run --carry .whl: bash benchmarks/run_h200.sh [TAG] [extra bench args…]
set -uo pipefail
tag=${1:-final}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/ficache
python3 -m pip install -q --no-deps --no-build-isolation -e . -e backends/cuda -e plugins/lvsa-flex || exit 1
out=${OUT:-benchmarks/results}
python3 -m lvsa info 2>&1 | tee "$out/lvsa-info-h200.txt"
python3 -m lvsa bench attention --no-progress --selfcheck --repeats 5 --tag "$tag" --out "$out" \
  --shapes wan1.3b-t81 wan1.3b-t121 wan14b-t81 hy-t65-text wan1.3b-t81-b2 hy-t65-text-b2 hy-t65 \
           hy-t49-text wan1.3b-t41 wan1.3b-t21 "$@" 2>&1 | tee "$out/bench-$tag.log"
