# Device machine, after isco800_setup.sh a, b and c: the recorded ISCO-800 run
# (docs/results.md). Resumable: each call continues where the last one stopped (the warm
# machine keeps /tmp/lr), within its own time budget. Usage: bash bench/gpu/isco800_run.sh SECONDS
set -uo pipefail
budget=${1:-540}
start=$(date +%s)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UPC_DATA_DIR=/tmp/lr ANONYMIZED_TELEMETRY=False TOKENIZERS_PARALLELISM=false
# The paper's thresholds and the gate on. Set for the GPU: all 500 users in flight, best of
# 4 samples per turn (2,000 rows a step), packed training batches of 32 examples.
export UPC_LEARNER__BATCH_SIZE=500 UPC_LEARNER__GATE_USERS=100 UPC_LEARNER__BEST_OF_N=4
export UPC_LEARNER__TRAIN_BATCH_SIZE=32 UPC_LEARNER__PACK_TOKENS=4096
export UPC_CHATBOT__LOAD_IN_4BIT=false UPC_LIMITS__MAX_BATCH_SIZE=2048 UPC_GENERATION__TIMEOUT_S=900
python3 -c "
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
print(ensure_embedded_model(load_settings().models_dir, Path('/tmp/smol.gguf')))" 2>&1 | tail -1
left=$(( budget - ($(date +%s) - start) ))
timeout $left python3 -m chatbot.cli learn iterate --iterations 3 --users 500 2>&1 \
  | grep -v -E "it/s\]|s/it\]|Warning|warn|Loading weights" | tee -a $OUT/iterate.log | tail -40
python3 bench/gpu/isco800_eval.py --budget $(( budget - ($(date +%s) - start) )) 2>&1 | tee -a $OUT/eval.log | tail -40
cd /tmp/lr && tar czf $OUT/runs.tgz --exclude='*.safetensors' --exclude='*.db*' runs adapters 2>/dev/null
ls -la $OUT
