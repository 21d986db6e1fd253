# Device machine, after isco800_setup.sh a-e: one curriculum iteration on all 500 train
# users, the same data trained under three recipes (SFT; DPO alone; DPO alone with
# a length term), and all of them against base on the 200 unseen test users (docs/results.md). Each phase is one call; the warm machine keeps
# /tmp/lr between calls. Usage: bash bench/gpu/variants_run.sh iterate|variants|eval SECONDS
set -uo pipefail
phase=$1
budget=${2:-560}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UPC_DATA_DIR=/tmp/lr ANONYMIZED_TELEMETRY=False TOKENIZERS_PARALLELISM=false
# The paper's thresholds; all 500 users in flight, best of 4 samples per turn, packed
# training batches of 32 examples.
export UPC_LEARNER__BATCH_SIZE=500 UPC_LEARNER__BEST_OF_N=4
export UPC_LEARNER__TRAIN_BATCH_SIZE=32 UPC_LEARNER__PACK_TOKENS=4096
export UPC_CHATBOT__LOAD_IN_4BIT=false UPC_LIMITS__MAX_BATCH_SIZE=2048 UPC_GENERATION__TIMEOUT_S=900
quiet() { grep -v -E "it/s\]|s/it\]|Warning|warn|Loading weights"; }
case "$phase" in
  iterate)
    python3 -c "
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
print(ensure_embedded_model(load_settings().models_dir, Path('/tmp/smol.gguf')))" 2>&1 | tail -1
    # The test evaluation below is the judge here, so the gate's validation pass is skipped.
    timeout "$budget" python3 -m learner learn iterate --iterations 1 --users 500 --no-gate \
      2>&1 | quiet | tee -a "$OUT/iterate.log" | tail -30 ;;
  variants)
    # The same selection under the two other recipes (`upc learn train` publishes each):
    # DPO alone from the base, plain and with R-DPO's length term.
    { UPC_LEARNER__EPOCHS=0 UPC_LEARNER__DPO=true UPC_LEARNER__DPO_LEARNING_RATE=5e-5 \
        python3 -m learner learn train --iteration 1 --no-progress 2>&1 | quiet | tail -30
      UPC_LEARNER__EPOCHS=0 UPC_LEARNER__DPO=true UPC_LEARNER__DPO_LEARNING_RATE=5e-5 \
        UPC_LEARNER__DPO_LENGTH_ALPHA="${LENGTH_ALPHA:-0.01}" \
        python3 -m learner learn train --iteration 1 --no-progress 2>&1 | quiet | tail -30
    } | tee -a "$OUT/variants.log" ;;
  eval)
    systems=$(python3 -c "
from core.settings import load_settings
from learner.registry import AdapterRegistry
from storage.db import Database
s = load_settings()
print(','.join(['base', *[m.id for m in AdapterRegistry(s.adapters_dir, Database.from_settings(s)).list()]]))")
    echo "systems: $systems"
    timeout "$budget" python3 -m learner eval --split test --users 200 --seeds "${SEEDS:-1}" --turns 5 \
      --systems "$systems" --out /tmp/lr/runs/eval-test --seed 7 --no-progress --no-memory \
      2>&1 | quiet | tail -40
    cd /tmp/lr && tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.db*' runs adapters ;;
esac
ls -la "$OUT"
