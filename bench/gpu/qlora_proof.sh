# Run on the device machine after wheels (.gpu/a, .gpu/b) and the split GGUF / MiniLM wheel were carried to /tmp (docs/results.md).
set -o pipefail
cat /tmp/gguf.part.aa .gpu/d/gguf.part.ab > /tmp/smol.gguf || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UPC_DATA_DIR=/tmp/gpu-data UPC_LEARNER__CRITIC=llm
python3 - <<'PY' 2>&1 | grep -v -E "it/s\]|s/it\]" | tail -40 | tee $OUT/learn.log
import argparse, time
from pathlib import Path
from core.runtime import ensure_embedded_model
from core.settings import load_settings
from learner import cli
s = load_settings()
ensure_embedded_model(s.models_dir, Path("/tmp/smol.gguf"))
p = argparse.ArgumentParser(); sub = p.add_subparsers(); cli.register(sub)
for argv in (["learn", "generate", "--users", "32", "--turns", "5", "--seed", "1", "--no-progress"], ["learn", "select", "--iteration", "1"]):
    t = time.perf_counter(); a = p.parse_args(argv); rc = a.func(a, s); print(argv[1], "rc", rc, "seconds", round(time.perf_counter() - t, 1))
PY
SFT=$(ls /tmp/gpu-data/runs/iter-001/sft.jsonl 2>/dev/null)
if [ -n "$SFT" ] && [ "$(wc -l < $SFT)" -ge 8 ]; then cp $SFT $OUT/sft.jsonl; else SFT=""; fi
python3 bench/gpu_qlora.py --gguf /tmp/smol.gguf --data /tmp/gpu-data ${SFT:+--sft $SFT} 2>&1 | grep -v -E "it/s\]|s/it\]|Warning|warn" | tail -60 | tee $OUT/gpu.log
cp docs/benchmarks.md $OUT/ 2>/dev/null; true
