#!/usr/bin/env bash
# Set up everything the tests need (system packages included) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing chromium for the browser tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ANONYMIZED_TELEMETRY=False
echo "==> ruff"
.venv/bin/ruff check core chatbot learner personas storage tests bench app.py
.venv/bin/ruff format --check core chatbot learner personas storage tests bench app.py
echo "==> pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
