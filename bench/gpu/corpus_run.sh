# Run on the device machine after .gpu/b's wheels were installed into /tmp/site and the
# first GGUF half was copied to /tmp (docs/benchmarks.md, corpus_throughput on GPU).
set -o pipefail
cat /tmp/gguf.part.aa .gpu/d/gguf.part.ab > /tmp/smol.gguf || exit 1
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
