# Device machine, after isco800_setup.sh has unpacked bench/gpu/bundle.sh's parts (the GGUF
# at /tmp/smol.gguf; the wheels and MiniLM in /tmp/site) (docs/results.md).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UPC_DATA_DIR=/tmp/lr
timeout 570 python3 - <<'PY' 2>&1 | grep -v -E "it/s\]|s/it\]|Warning|warn" | tail -30
import argparse, os, sys, time
from core.settings import load_settings
from storage import Database
from learner.registry import AdapterRegistry
from learner import eval_cli
s = load_settings()
reg = AdapterRegistry(s.adapters_dir, Database.from_settings(s))
ids = [m.id for m in sorted(reg.list(), key=lambda m: m.iteration or 0)]
systems = ",".join(["base", *ids])
print("systems:", systems, flush=True)
p = argparse.ArgumentParser(); sub = p.add_subparsers(); eval_cli.register(sub)
a = p.parse_args(["eval", "--split", "test", "--users", "50", "--turns", "5", "--systems", systems, "--critic", "embedding", "--out", os.environ["OUT"] + "/eval", "--seed", "7", "--no-progress"])
t = time.perf_counter(); rc = a.func(a, s); print("eval rc", rc, "wall_s", round(time.perf_counter() - t, 1))
PY
ls $OUT/eval
