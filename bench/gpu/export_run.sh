# Device machine (16 cores), after isco800_setup.sh (pyarrow, SQLAlchemy in /tmp/site) and
# with .whl carried: the wheels below, fetched here with `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64`. Exports 1M messages in each format at once.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .whl/sqlalchemy*.whl .whl/greenlet*.whl .whl/datasets*.whl .whl/dill*.whl \
  .whl/multiprocess*.whl .whl/xxhash*.whl .whl/fsspec*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 570 python3 bench/export_rss.py --messages 1000000 --parallel --workdir /tmp/exb --keep \
  2>&1 | tail -120 | tee $OUT/export_rss.json
cp docs/benchmarks.md $OUT/ 2>/dev/null; true
