#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: torch, lvsa, its backend
# distributions, the plugins and the test tools. Idempotent; safe to run before every
# command. It says what it installs as it goes (on stderr).
#
# torch (only when .venv has none): torch==2.13.0 from a local wheel when pip finds one
# without an index (find-links), else the CUDA build from the default index when an NVIDIA
# GPU is visible (nvidia-smi -L), else the CPU build from the PyTorch CPU index (what the
# README promises; LVSA_TORCH_INDEX_URL overrides that index).
#   bash ci/bootstrap.sh --torch-plan   prints the torch install it would run, installs nothing
set -euo pipefail
trap 'echo "ci/bootstrap.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC="torch==2.13.0"
CPU_INDEX=${LVSA_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
say() { echo "ci/bootstrap.sh: $*" >&2; }

# the pip arguments that install torch here, and (on stdout, second line) where it comes from
torch_plan() {
  if "$1" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --no-index --no-deps "$TORCH_SPEC" \
       >/dev/null 2>&1; then
    # (its dependencies come from wherever pip finds them, as for every other package)
    echo "$TORCH_SPEC"; echo "a local wheel (pip find-links)"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "$TORCH_SPEC"; echo "the default index (CUDA build: an NVIDIA GPU is visible)"
  else
    echo "--index-url $CPU_INDEX $TORCH_SPEC"; echo "the CPU build from $CPU_INDEX (no GPU visible)"
  fi
}

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
fi
if [ "${1:-}" = "--torch-plan" ]; then
  torch_plan .venv/bin/python
  exit 0
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=.venv/.lvsa-bootstrap
want=$(cat ci/bootstrap.sh ci/requirements.txt pyproject.toml $(ls backends/*/pyproject.toml plugins/*/pyproject.toml 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  say ".venv is up to date (nothing to install)"
  exit 0
fi
if .venv/bin/python -c "import torch" 2>/dev/null; then
  say "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') is already installed"
else
  mapfile -t plan < <(torch_plan .venv/bin/python)
  say "installing $TORCH_SPEC from ${plan[1]} (a large download the first time)"
  # shellcheck disable=SC2086  # the plan is a word list
  "${PIP[@]}" ${plan[0]}
fi
say "installing the runtime and test requirements (ci/requirements.txt): $(grep -v '^#' ci/requirements.txt | grep -c .) packages"
"${PIP[@]}" -r ci/requirements.txt
editables=(-e .)
names=(.)
for d in backends/* plugins/*; do
  [ -f "$d/pyproject.toml" ] && editables+=(-e "$d") && names+=("$d")
done
say "installing lvsa and its distributions in editable mode: ${names[*]}"
"${PIP[@]}" --no-build-isolation "${editables[@]}"
echo "$want" > "$stamp"
say "done: .venv/bin/python -m pytest, .venv/bin/lvsa"
