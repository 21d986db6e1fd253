# Device machine, after isco800_setup.sh has unpacked bench/gpu/bundle.sh's parts (the GGUF
# at /tmp/smol.gguf; the wheels and MiniLM in /tmp/site) (docs/results.md).
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UPC_DATA_DIR=/tmp/lr
export UPC_LEARNER__CRITIC=embedding UPC_LEARNER__ALPHA=1 UPC_LEARNER__BETA=0
timeout 560 python3 - <<'PY' 2>&1 | grep -v -E "it/s\]|s/it\]|Warning|warn" | tail -40 | tee $OUT/learn.log
import time
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from learner.iterate import build_driver, format_table
s = load_settings()
ensure_embedded_model(s.models_dir, Path("/tmp/smol.gguf"))
t = time.perf_counter()
states = build_driver(s, gate=False, progress_bar=False).run(3, users=16, on_iteration=lambda st: print("done iteration", st.iteration, round(time.perf_counter() - t), "s", flush=True))
print(format_table(states))
print("wall_s", round(time.perf_counter() - t, 1))
PY
cd /tmp/lr && tar czf $OUT/runs.tgz runs adapters --exclude='*.safetensors' 2>/dev/null; true
