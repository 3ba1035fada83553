#!/usr/bin/env bash
# Set up (or reuse) .venv-vllm-omni: the REAL vllm-omni 0.30.0 and vllm 0.30.0 on the CPU
# build of torch 2.13, for tests/vllm_omni. Kept apart from .venv so lvsa's own
# environment never pulls vllm.
#
# vllm and vllm-omni are installed with --no-deps (their full requirements are CUDA
# kernels, serving stacks and audio/vision extras the tests never import); the packages
# their import chains need are pinned in ci/vllm-omni-requirements.txt and installed with
# --no-deps too, so nothing can replace the CPU torch. Two things cannot work on a CPU
# and are stubbed by tests/vllm_omni/conftest.py: vllm's CUDA op library (loads
# libcuda.so.1) and the CUDA platform's device queries.
#
# Cached: a stamp of this script, the pins and lvsa's pyproject files; a matching venv is
# reused as it is (a fresh one downloads ~330 MB from PyPI, ~5 minutes on 2 cores).
set -euo pipefail
trap 'echo "ci/vllm_omni_env.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
VENV=${LVSA_VLLM_OMNI_VENV:-.venv-vllm-omni}
PY=${PYTHON:-python3}
stamp=$VENV/.lvsa-vllm-omni-env
want=$(cat ci/vllm_omni_env.sh ci/vllm-omni-requirements.txt pyproject.toml plugins/lvsa-vllm-omni/pyproject.toml \
       | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" --no-deps "vllm==0.30.0" "vllm-omni==0.30.0"
"${PIP[@]}" --no-deps -r ci/vllm-omni-requirements.txt
# lvsa and the plugin (editable, so the tests run the working tree)
"${PIP[@]}" --no-deps --no-build-isolation -e . -e plugins/lvsa-vllm-omni
"$VENV/bin/python" - <<'EOF'
import torch, vllm, vllm_omni
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: the CPU build 2.13.0 was replaced"
assert not torch.cuda.is_available()
print(f"vllm-omni {vllm_omni.__version__} on vllm {vllm.__version__}, torch {torch.__version__}")
EOF
echo "$want" > "$stamp"
