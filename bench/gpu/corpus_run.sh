# Device machine, after isco800_setup.sh has unpacked bench/gpu/bundle.sh's parts (the GGUF
# at /tmp/smol.gguf; the wheels and MiniLM in /tmp/site): corpus_throughput on GPU
# (docs/benchmarks.md).
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UPC_DATA_DIR=/tmp/gpu-data
python3 - <<'PY' || exit 1
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
print(ensure_embedded_model(load_settings().models_dir, Path("/tmp/smol.gguf")))
PY
python3 bench/corpus_throughput.py --model-dir /tmp/gpu-data/models/smollm2-135m-instruct \
  --device cuda --no-4bit --users 16 --turns 5 --max-new-tokens 64 --sequential-users 4 \
  2>&1 | grep -v -E "it/s\]|s/it\]|Warning|warn" | tail -70 | tee $OUT/corpus_gpu.json
cp docs/benchmarks.md $OUT/ 2>/dev/null; true
