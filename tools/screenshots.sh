#!/usr/bin/env bash
# Screenshots of every console view, from the real app on a real X server (Debian's Xvfb).
#
# Starts a hub on a free loopback port, a demo fleet of a few hundred protocol agents
# (tether-agent simulate: some degraded, a dozen gone, a little churn), runs one exec job so the
# jobs view has results, then runs `tether-console --screenshot` once per view under
# xvfb-run. Output: docs/screenshots/<view>.png, plus dashboard.png and dashboard-light.png.
#
#   tools/screenshots.sh   (needs: apt-get install -y xvfb libxcb-cursor0 libxkbcommon-x11-0)
#   PYTHON=/path/to/python COUNT=500 tools/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
COUNT=${COUNT:-300}
SETTLE=${SETTLE:-25}
OUT=docs/screenshots
mkdir -p "$OUT"
command -v xvfb-run >/dev/null || { echo "needs xvfb-run and Qt's xcb libraries: apt-get install -y xvfb libxcb-cursor0 libxkbcommon-x11-0 fonts-dejavu-core" >&2; exit 2; }

WORK=$(mktemp -d)
HUB_PID=""; FLEET_PID=""
cleanup() {
  [ -n "$FLEET_PID" ] && kill "$FLEET_PID" 2>/dev/null || true
  [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

cat > "$WORK/hub.toml" <<TOML
hub_id = "hub-demo-1"
heartbeat_interval = 10.0
alert_offline_grace = 5.0
TOML
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m hub serve --listen 127.0.0.1:0 --data-dir "$WORK/data" --config "$WORK/hub.toml" \
  >"$WORK/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 100); do
  PORT=$(grep -oE 'listening on [0-9.]+:[0-9]+' "$WORK/hub.log" | grep -oE '[0-9]+$' || true)
  [ -n "$PORT" ] && break
  sleep 0.2
done
[ -n "${PORT:-}" ] || { echo "hub did not start" >&2; cat "$WORK/hub.log" >&2; exit 1; }
HUB="ws://127.0.0.1:$PORT"
ENROLL=$("$PY" -m hub token create --data-dir "$WORK/data" --enroll)
ADMIN=$("$PY" -m hub token create --data-dir "$WORK/data" --admin --role operator --name noc)
sleep 1.5  # the running hub picks up new credentials within a second

"$PY" -m agent simulate --hub "$HUB" --token "$ENROLL" --count "$COUNT" --rate 500 \
  --churn 0.02 --degraded 0.05 --prefix demo- --log-level warning >"$WORK/fleet.log" 2>&1 &
FLEET_PID=$!
# A few agents that register and then vanish: offline agents and their alerts.
"$PY" -m agent simulate --hub "$HUB" --token "$ENROLL" --count 12 --rate 100 --prefix gone- \
  --log-level warning >"$WORK/gone.log" 2>&1 &
GONE_PID=$!
online() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^tether_agents\{state="online"\}/ {print int($2)}'; }
for _ in $(seq 300); do [ "$(online)" -ge $((COUNT + 12)) ] 2>/dev/null && break; sleep 0.2; done
kill -9 "$GONE_PID" 2>/dev/null || true
echo "hub $HUB, $(online) agents online"

# A job with results and output for the jobs view (some agents fail, on purpose).
"$PY" -m hub send --hub "$HUB" --token "$ADMIN" ping --selector "region=ap-*" \
  --wait --wait-timeout 30 >/dev/null || true
"$PY" -m hub send --hub "$HUB" --token "$ADMIN" exec --selector "region=eu-*" \
  --args '{"argv": ["uptime"]}' --wait --wait-timeout 30 >/dev/null || true
sleep 6  # agent_offline alerts fire after their grace period

shot() {  # shot NAME [console args...]
  local name=$1; shift
  xvfb-run -a -s "-screen 0 1600x1000x24" \
    "$PY" -m console --hub "$HUB" --token "$ADMIN" --settings "$WORK/console.ini" \
    --screenshot "$OUT/$name.png" "$@"
  echo "wrote $OUT/$name.png"
}
for view in map agents topology alerts jobs; do
  shot "$view" --view "$view"
done
TETHER_CONSOLE_SCREENSHOT_SETTLE=$SETTLE shot graphs --view graphs
TETHER_CONSOLE_SCREENSHOT_SETTLE=$SETTLE shot dashboard
shot dashboard-light --light
