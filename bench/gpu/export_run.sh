# Run on the device machine (16 cores) after .gpu/a's pyarrow wheel was installed into
# /tmp/site: installs the rest from .gpu/b, then exports 1M messages in each format at once.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .gpu/b/sqlalchemy*.whl .gpu/b/greenlet*.whl .gpu/b/datasets*.whl .gpu/b/dill*.whl \
  .gpu/b/multiprocess*.whl .gpu/b/xxhash*.whl .gpu/b/fsspec*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 570 python3 bench/export_rss.py --messages 1000000 --parallel --workdir /tmp/exb --keep \
  2>&1 | tail -120 | tee $OUT/export_rss.json
cp docs/benchmarks.md $OUT/ 2>/dev/null; true
