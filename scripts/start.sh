#!/usr/bin/env bash
# Set up (if needed) and start UPC Chat on http://127.0.0.1:7860 with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 ANONYMIZED_TELEMETRY=False
exec .venv/bin/upc serve "$@"
