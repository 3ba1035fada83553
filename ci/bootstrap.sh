#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: torch (the small CPU
# build on machines without a GPU), lvsa, its backend distributions, the plugins and the
# test tools. Idempotent; safe to run before every command.
set -euo pipefail
trap 'echo "ci/bootstrap.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=.venv/.lvsa-bootstrap
want=$(cat ci/bootstrap.sh ci/requirements.txt pyproject.toml $(ls backends/*/pyproject.toml plugins/*/pyproject.toml 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -r ci/requirements.txt
  editables=(-e .)
  for d in backends/* plugins/*; do
    [ -f "$d/pyproject.toml" ] && editables+=(-e "$d")
  done
  "${PIP[@]}" --no-build-isolation "${editables[@]}"
  echo "$want" > "$stamp"
fi
