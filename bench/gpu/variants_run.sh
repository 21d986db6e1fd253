# Device machine, after isco800_setup.sh has unpacked the bundle: one curriculum iteration
# on all 500 train users with the gate on, its adapter trained by the main recipe (DPO
# alone from the base; a rejected reply's end-of-turn is no label), and base against the
# adapters on the 200 unseen test users (docs/results.md). Each phase is one call; the
# warm machine keeps /tmp/lr between calls. Phases:
#   iterate   learn iterate --until train (generate, select, train)
#   resume    learn iterate: the rest of the iteration (the gate, promotion)
#   variants  one other recipe on the same selection (drifting pairs dropped), then resume
#   pairs     one recipe on a run's recorded pairs (RECORDED, committed), then `learn gate`
#   restore   a fresh machine (after setup) takes back the state a lost one returned
#   eval      base and the adapters on the 200 test users; SYSTEMS=base,ID EVAL_NAME=eval-a
#             splits it (two systems of 200 users take about one call)
# A phase cut by its slice resumes where it stopped when run again (dialogues are stored
# turn by turn). A machine that waits too long for its next call goes back with /tmp, so
# each learning phase returns the data dir (without the materialised model) as
# $OUT/state.tgz.*; copy those here into .gpu/state/ and run `restore` with
# carry [".gpu/state"] on the fresh machine. Usage: bash bench/gpu/variants_run.sh PHASE SECONDS
set -uo pipefail
phase=$1
budget=${2:-560}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UPC_DATA_DIR=/tmp/lr ANONYMIZED_TELEMETRY=False TOKENIZERS_PARALLELISM=false
# The paper's thresholds; all 500 users in flight, best of 4 samples per turn, packed
# training batches of 32 examples; the gate on 100 validation users x 2 seeds.
export UPC_LEARNER__BATCH_SIZE=500 UPC_LEARNER__BEST_OF_N=4 UPC_LEARNER__GATE_USERS=100
export UPC_LEARNER__TRAIN_BATCH_SIZE=32 UPC_LEARNER__PACK_TOKENS=4096
export UPC_CHATBOT__LOAD_IN_4BIT=false UPC_LIMITS__MAX_BATCH_SIZE=2048 UPC_GENERATION__TIMEOUT_S=900
# The main recipe: DPO alone from the base, all pairs (dpo_rejected_turn_end off: default).
export UPC_LEARNER__EPOCHS=0 UPC_LEARNER__DPO=true UPC_LEARNER__DPO_LEARNING_RATE=5e-5
quiet() { grep --line-buffered -v -E "it/s\]|s/it\]|Warning|warn|Loading weights"; }
snapshot() {
  (cd /tmp && tar czf - --exclude=lr/models lr) | split -b 15m - "$OUT/state.tgz."
  du -ch "$OUT"/state.tgz.* | tail -1
}
if [ "$phase" = restore ]; then
  rm -rf /tmp/lr && cat .gpu/state/state.tgz.* | tar -C /tmp -xzf - && du -sh /tmp/lr
fi
python3 -c "
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
print(ensure_embedded_model(load_settings().models_dir, Path('/tmp/smol.gguf')))" 2>&1 | tail -1
case "$phase" in
  restore) ;;
  iterate)
    timeout "$budget" python3 -m learner learn iterate --iterations 1 --users "${USERS:-500}" --until train \
      2>&1 | quiet | tee -a "$OUT/iterate.log" | tail -30
    snapshot ;;
  resume)
    timeout "$budget" python3 -m learner learn iterate --iterations 1 2>&1 | quiet \
      | tee -a "$OUT/resume.log" | tail -40
    snapshot ;;
  variants)
    # The same selection without the pairs whose chosen reply drifts from the user's last
    # message (`learn train` publishes it as a candidate); then the iteration resumes at
    # the gate, which judges the main recipe's adapter against base.
    { UPC_LEARNER__DPO_RELEVANCE_MARGIN=0.1 \
        python3 -m learner learn train --iteration 1 --no-progress 2>&1 | quiet | tail -12
      timeout "$budget" python3 -m learner learn iterate --iterations 1 2>&1 | quiet | tail -30
    } | tee -a "$OUT/variants.log"
    snapshot ;;
  pairs)
    # Another recipe (its UPC_LEARNER__* on the command line) retrained on the pairs a run
    # recorded (RECORDED), no corpus generated again; then gated alone against the active
    # adapter (promoted when it passes).
    recorded=${RECORDED:-docs/results/isco800-2026-12-02-b/pairs.jsonl.gz}
    { python3 -m learner learn train --iteration "${ITERATION:-1}" --pairs "$recorded" \
        --no-progress 2>&1 | quiet | tee /tmp/train.out | tail -30
      id=$(python3 -c "import json,sys; t=open('/tmp/train.out').read(); print(json.JSONDecoder().raw_decode(t[t.index('{'):])[0]['adapter_id'])")
      echo "candidate: $id"
      timeout "$budget" python3 -m learner learn gate --adapter "$id" --promote 2>&1 | quiet \
        > "$OUT/gate-$id.out"
      python3 - "$OUT/gate-$id.out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
d = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
print({k: d[k] for k in ("promote", "promoted", "delta", "lower", "upper", "n_users")})
print("regressions:", [(r["key"], r.get("baseline"), r.get("candidate")) for r in d["regressions"]])
for side in ("baseline", "candidate"):
    print(side, {k: v for k, v in d[side].items() if isinstance(v, (int, float))})
print(text.strip().splitlines()[-1])
PY
    } | tee -a "$OUT/pairs.log"
    snapshot ;;
  eval)
    systems=${SYSTEMS:-$(python3 -c "
from core.settings import load_settings
from learner.registry import AdapterRegistry
from storage.db import Database
s = load_settings()
print(','.join(['base', *[m.id for m in AdapterRegistry(s.adapters_dir, Database.from_settings(s)).list()]]))")}
    echo "systems: $systems"
    timeout "$budget" python3 -m learner eval --split test --users 200 --seeds "${SEEDS:-1}" --turns 5 \
      --systems "$systems" --out "/tmp/lr/runs/${EVAL_NAME:-eval-test}" --seed 7 --no-progress --no-memory \
      2>&1 | quiet | tail -40
    # Reports, transcripts, the iteration's state and pairs, the adapters' manifests; in
    # parts under the 16 MiB a returned file may have.
    (cd /tmp/lr && tar czf - --exclude='*.safetensors' --exclude='*.db*' runs adapters) \
      | split -b 15m - "$OUT/runs.tgz."
    # The active (promoted) adapter whole, in parts under the 16 MiB a returned file may have.
    active=$(cd "$OLDPWD" && python3 -c "
from core.settings import load_settings
from learner.registry import AdapterRegistry
from storage.db import Database
s = load_settings()
print(AdapterRegistry(s.adapters_dir, Database.from_settings(s)).active_id())")
    echo "active: $active"
    if [ "$active" != base ]; then
      tar cf - -C /tmp/lr/adapters "$active" | split -b 9500k - "$OUT/active-$active.tar."
    fi ;;
esac
ls -la "$OUT"
