#!/usr/bin/env bash
# Screenshots of the console on a cluster, from the real app (Qt's offscreen platform).
#
# A redis-server of its own on a free port, three hubs on it, 300 simulated agents: hub-a's
# know only hub-a (so that they stay `unknown` when it dies), hub-b's and hub-c's know every
# hub. Then:
#   cluster-topology.png  the topology view of the healthy cluster
#   cluster-hub-down.png  a console started on hub-a (with hub-b and hub-c as fallbacks);
#                         hub-a is killed with -9 while it runs: the console fails over to
#                         hub-b by itself, hub-a's node turns red, its agents unknown
#   cluster-agents.png    the agent table after it, with its Hub column
#
#   tools/cluster_screenshots.sh   (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=docs/screenshots
mkdir -p "$OUT"
command -v redis-server >/dev/null || { echo "needs redis-server (./scripts/bootstrap.sh installs it)" >&2; exit 2; }
export QT_QPA_PLATFORM=offscreen PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

WORK=$(mktemp -d)
pids=()
cleanup() {
  local i
  for (( i=${#pids[@]}-1; i>=0; i-- )); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 100); do listening "$1" && return 0; sleep 0.1; done; return 1; }

REDIS_PORT=$(free_port)
REDIS="redis://127.0.0.1:$REDIS_PORT/0"
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --save "" \
  --appendonly yes >"$WORK/redis.log" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT"
ENROLL=$("$PY" -m hub token create --redis "$REDIS" --enroll)
ADMIN=$("$PY" -m hub token create --redis "$REDIS" --admin --role operator --name noc)

declare -A URL PID
for id in hub-a hub-b hub-c; do
  port=$(free_port)
  "$PY" -m hub serve --listen "127.0.0.1:$port" --data-dir "$WORK/$id" --redis "$REDIS" \
    --hub-id "$id" >"$WORK/$id.log" 2>&1 &
  pids+=($!)
  PID[$id]=$!
  URL[$id]="ws://127.0.0.1:$port"
  wait_port "$port"
done

sim() {  # sim PREFIX COUNT SEED URL...
  local prefix=$1 count=$2 seed=$3; shift 3
  local hubs=()
  for url in "$@"; do hubs+=(--hub "$url"); done
  "$PY" -m agent simulate "${hubs[@]}" --token "$ENROLL" --count "$count" --prefix "$prefix" \
    --seed "$seed" --degraded 0.03 --log-level warning >"$WORK/$prefix.log" 2>&1 &
  pids+=($!)
}
sim a- 90 1 "${URL[hub-a]}"
sim b- 110 2 "${URL[hub-b]}" "${URL[hub-c]}" "${URL[hub-a]}"
sim c- 100 3 "${URL[hub-c]}" "${URL[hub-b]}" "${URL[hub-a]}"
online() { curl -s "http://127.0.0.1:${URL[hub-b]##*:}/metrics" | awk '/^tether_agents\{state="online"\}/ {print int($2)}'; }
for _ in $(seq 300); do [ "$(online)" -ge 300 ] 2>/dev/null && break; sleep 0.2; done
sleep 3  # a few ticks for the graphs and the hubs' leases
echo "cluster up: $(online) agents online"

console() {  # console PNG VIEW URLS [settle]
  TETHER_CONSOLE_SCREENSHOT_SETTLE=${4:-0} "$PY" -m console --hub "$3" --token "$ADMIN" \
    --settings "$WORK/console.ini" --screenshot "$1" --view "$2"
}
console "$OUT/cluster-topology.png" topology "${URL[hub-b]},${URL[hub-a]},${URL[hub-c]}"
echo "wrote $OUT/cluster-topology.png"

# A console on hub-a while hub-a dies: it fails over, and shows hub-a down.
ALL="${URL[hub-a]},${URL[hub-b]},${URL[hub-c]}"
console "$OUT/cluster-hub-down.png" topology "$ALL" 16 &
SHOT=$!
sleep 7
kill -9 "${PID[hub-a]}"
wait "$SHOT"
echo "wrote $OUT/cluster-hub-down.png"
console "$OUT/cluster-agents.png" agents "$ALL"
echo "wrote $OUT/cluster-agents.png"
