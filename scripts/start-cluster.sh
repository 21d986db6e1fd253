#!/usr/bin/env bash
# Start UPC Chat scaled out on one host: a Chroma server, N app replicas and one learning
# worker, all on one PostgreSQL database and one shared data dir. Put a load balancer in
# front of the replicas (docs/deploy.md has an nginx example). Ctrl-C or SIGTERM stops all.
#
#   UPC_DATABASE_URL=postgresql://upc@db-host/upc scripts/start-cluster.sh [replicas]
#
# Optional: UPC_DATA_DIR (shared dir: adapters, runs, exports, models; default ./upc-data),
# UPC_CHROMA_URL (an existing Chroma server; else one is started here on UPC_CHROMA_PORT,
# default 8000), UPC_BASE_PORT (first replica's port, default 7861), UPC_VENV (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${UPC_DATABASE_URL:?set UPC_DATABASE_URL to the PostgreSQL URL (postgresql://user@host/db)}"
replicas=${1:-2}
base_port=${UPC_BASE_PORT:-7861}
chroma_port=${UPC_CHROMA_PORT:-8000}
venv=${UPC_VENV:-.venv}
export UPC_DATA_DIR=${UPC_DATA_DIR:-./upc-data}
logs="$UPC_DATA_DIR/logs"
mkdir -p "$logs"

pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop_all EXIT INT TERM

wait_http() {  # url, seconds
  for _ in $(seq "$((${2} * 5))"); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "error: $1 did not answer in ${2}s" >&2
  return 1
}

if [ -z "${UPC_CHROMA_URL:-}" ]; then
  "$venv/bin/chroma" run --path "$UPC_DATA_DIR/chroma-server" --host 127.0.0.1 \
    --port "$chroma_port" >"$logs/chroma.log" 2>&1 &
  pids+=($!)
  export UPC_CHROMA_URL="http://127.0.0.1:$chroma_port"
  wait_http "$UPC_CHROMA_URL/api/v2/heartbeat" 60
fi

# Every replica must sign browser state with the same secret: make it once, share it.
if [ -z "${UPC_SESSION_SECRET:-}" ]; then
  key="$UPC_DATA_DIR/session.key"
  if [ ! -s "$key" ]; then
    (umask 077 && "$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$key")
  fi
  UPC_SESSION_SECRET=$(cat "$key")
  export UPC_SESSION_SECRET
fi

# Once, before the replicas start: the embedded model's files (replicas would race to
# write them) and the schema (applied under a lock anyway, but fails fast here).
HF_HUB_OFFLINE=1 "$venv/bin/upc" materialize

for i in $(seq 0 "$((replicas - 1))"); do
  port=$((base_port + i))
  # The replicas serve chat only; the worker below runs the learning jobs.
  UPC_LEARNER__SCHEDULER_ENABLED=false "$venv/bin/upc" serve --port "$port" \
    >"$logs/app-$port.log" 2>&1 &
  pids+=($!)
done
"$venv/bin/upc" worker >"$logs/worker.log" 2>&1 &
pids+=($!)

for i in $(seq 0 "$((replicas - 1))"); do
  wait_http "http://127.0.0.1:$((base_port + i))/healthz" 300
done
echo "==> $replicas replicas on ports $base_port..$((base_port + replicas - 1)), one worker,"
echo "    Chroma at $UPC_CHROMA_URL; logs in $logs. Ctrl-C stops everything."
# Any process that exits takes the others down: a supervisor (systemd, k8s) restarts them.
wait -n
echo "==> a process exited; stopping the rest" >&2
exit 1
