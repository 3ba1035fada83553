#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite on the CPU (Triton kernels
# under TRITON_INTERPRET=1, checked mode on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
export LVSA_CHECK=1 TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
