#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite on the CPU (Triton kernels
# under TRITON_INTERPRET=1, checked mode on). A second run, in its own environment
# (ci/vllm_omni_env.sh, cached), tests lvsa-vllm-omni against the real vllm-omni 0.30;
# LVSA_SKIP_VLLM_OMNI=1 leaves it out (arguments given: only the first run, on them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/bootstrap.sh
export LVSA_CHECK=1 TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
# this script's own switch, not lvsa's: left exported, lvsa warns that nothing reads it, and
# tests that record every event (test_jsonl_plugin) see that warning first
skip_vllm_omni="${LVSA_SKIP_VLLM_OMNI:-0}"
unset LVSA_SKIP_VLLM_OMNI
if [ "$#" -gt 0 ] || [ "$skip_vllm_omni" = "1" ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
bash ci/vllm_omni_env.sh
LVSA_VLLM_OMNI_ENV=1 .venv-vllm-omni/bin/python -m pytest -q tests/vllm_omni
