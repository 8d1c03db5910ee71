#!/bin/bash
# Regenerates agent/link/hot-text.ld: the functions the agent runs from start
# to idle, as linker-script patterns that group them at the front of the
# code (see hot-text.ld's header and ARCHITECTURE.md, "Code layout").
#
# It runs an unstripped `dist` build under callgrind, which records every
# function executed, against a private Mosquitto on 127.0.0.1 with the
# packaged configuration: start-up, 2,000 readings from 50 sensors (windows,
# an alert, aggregates out), a metrics scrape, then idle while windows close
# and checkpoints are written. Shutdown is not recorded.
#
# Needs valgrind, mosquitto, mosquitto-clients and curl. Takes under a minute
# besides the build. Run it (from anywhere) after changes that move start-up
# or idle work; a stale list costs resident memory, never correctness
# (patterns that match nothing are ignored).
#
#   SLUICE_COLLECT_TARGET  cargo's target folder (default: target/)
#   SLUICE_COLLECT_KEEP    also copy the callgrind dump to this path
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18841
metrics=19941

target_dir=${SLUICE_COLLECT_TARGET:-$root/target}
CARGO_PROFILE_DIST_STRIP=false cargo build --profile dist -p sluice --bin sluice \
  --target-dir "$target_dir"
bin="$target_dir/dist/sluice"

mosquitto -p "$port" >"$work/mosquitto.log" 2>&1 &
sed -e "s/^port = 1883/port = $port/" \
    -e "s/127.0.0.1:9898/127.0.0.1:$metrics/" \
    -e "s|^path = \"/var/lib/sluice/state.db\"|path = \"$work/state.db\"|" \
    packaging/config/sluice.toml >"$work/sluice.toml"
grep -q "port = $port" "$work/sluice.toml"
grep -q "$work/state.db" "$work/sluice.toml"

valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  --dump-instr=no --compress-strings=no --compress-pos=no --demangle=no \
  "$bin" run --config "$work/sluice.toml" >"$work/agent.log" 2>&1 &
agent=$!

# Start-up under valgrind, then traffic, a scrape, and idle.
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$metrics/metrics" >/dev/null && break
  sleep 1
done
for round in $(seq 40); do
  for s in $(seq -w 1 50); do
    value=21.$round
    [ "$round" = 40 ] && [ "$s" = 07 ] && value=950
    echo "{\"sensor\":\"s-00$s\",\"ts\":$(date +%s%3N),\"value\":$value}"
  done | mosquitto_pub -p "$port" -t sensors/a -l
  sleep 0.1
done
sleep 5
curl -sf "http://127.0.0.1:$metrics/metrics" >"$work/metrics"
sleep 20
# The run must have done the work it stands for.
processed=$(awk '$1 ~ /^sluice_readings_processed_total({|$)/ {n += $2} END {print n}' "$work/metrics")
alerts=$(awk '$1 ~ /^sluice_alerts_raised_total({|$)/ {n += $2} END {print n}' "$work/metrics")
if [ "${processed:-0}" != 2000 ] || [ "${alerts:-0}" = 0 ]; then
  echo "collect.sh: the agent processed ${processed:-no} readings and raised ${alerts:-no} alerts (want 2000 and some)" >&2
  cat "$work/agent.log" >&2
  exit 1
fi
callgrind_control --dump "$agent" >/dev/null
sleep 2
kill -TERM "$agent"
wait "$agent" || true

# The dump taken before shutdown: every function of the binary that ran.
dump=$(ls "$work"/callgrind.out.* | head -1)
[ -z "${SLUICE_COLLECT_KEEP:-}" ] || cp "$dump" "$SLUICE_COLLECT_KEEP"
python3 agent/link/patterns.py "$bin" "$dump" >agent/link/hot-text.ld
grep -c '^    \*(' agent/link/hot-text.ld | sed 's/^/functions: /'
