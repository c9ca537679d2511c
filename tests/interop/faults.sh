#!/usr/bin/env bash
# Fault tests (issue 7, "Reliability I"): the release binary against faults injected from
# outside, judged by independent peers only.
#   MQTT:    Mosquitto 2.0 (two instances of ours on free loopback ports: one that stays up,
#            one with persistence that faults.py kills), the gateway's embedded broker, and
#            faults.py's relay (a TCP proxy that parses MQTT packets) where a test needs to
#            see or drop packets
#   Modbus:  the pymodbus slave (slave.py) over TCP: its write log counts executions
#   cloud:   paho-mqtt clients in faults.py (the tests), built on faultkit.py (processes, logs,
#            the cloud, the relay, the counting of lost and duplicated messages)
# The tests (faults.py has the details and the definitions of "lost" and "duplicated"):
#   1. flood     10,000 `set` commands through Mosquitto, then through the embedded broker
#   2. poison    a 2 MiB command, clean and persistent session
#   3. broker    Mosquitto killed with SIGKILL 10 times during telemetry and commands
#   4. gateway   the gateway killed with SIGKILL 5 times during a command stream
#   5. flaky     PUBLISH dropped both ways for 12 s, then the link heals
#   6. sigterm   SIGTERM with 20 dead devices, SIGHUP, a second SIGTERM
# Each test prints a `MEASURED` line (sent / answered / lost / duplicated / executed twice,
# drain time, reconnects) that the summary repeats. Loopback only; every process is stopped
# by its pid; the whole run takes about 4 minutes.
#
# Prerequisites (.ci/run installs them): mosquitto, the venv at target/interop-venv with
# pymodbus and paho-mqtt (or INTEROP_PYTHON), target/release/twinbus (or TWINBUS).
#
# Every check prints `ok   NAME` or `FAIL NAME: WHY` (detail lines are indented); the last
# line is `interop faults: N passed, N failed`. Exit status 1 if any check failed.
#
# Environment:
#   FAULTS_ONLY="flood poison ..."  run only these tests
#   INTEROP_KEEP=1                  keep the work directory (configs, logs) after the run
#   RUST_LOG                        passed to the gateway (default: info)
# shellcheck disable=SC2317 # failure_logs and its helper run from the EXIT trap
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/lib.sh"
begin faults "interop faults"

FAILED_TESTS=()  # names of the tests with a failed check, for failure_logs

# After a failure: the failed tests' gateway logs (warnings, then the last lines), and the
# brokers' and the slave's tails.
failure_logs() {
    local name f
    for name in "${FAILED_TESTS[@]}"; do
        f=$WORK/gw-$name.log
        [[ -s $f ]] || continue
        echo "----- ${f#"$WORK"/}: WARN/ERROR lines, then the last lines -----"
        grep -E ' (WARN|ERROR) ' "$f" | sort -k3 | uniq -c -f2 | sort -rn | head -n 8 || true
        echo "  ..."
        tail -n 12 "$f"
    done
    show_logs tail_20 mosquitto.log mosquitto-kill.log slave.log
}
tail_20() { grep -v -e ' faults-cloud-' -e '^>>>>>' -e 'Saving in-memory' "$1" | tail -n 20; }

prerequisites "$MOSQUITTO"
"$PY" -c 'import paho.mqtt.client' 2>/dev/null || die "python venv" "paho-mqtt missing in $PY's venv"
[[ $SKIP_GATEWAY != 1 ]] || { echo "faults: INTEROP_SKIP_GATEWAY=1: nothing to test without the gateway"; finish; }

ONLY=${FAULTS_ONLY:-flood poison broker gateway flaky sigterm}
wanted() { [[ " $ONLY " == *" $1 "* ]]; }

{ read -r P_MQTT && read -r P_KILL && read -r P_EMBEDDED && read -r P_RELAY_KILL && read -r P_RELAY_GW &&
    read -r P_RELAY_FLAKY && read -r P_MODBUS && read -r P_DEAD; } < <(free_ports 8)
echo "faults: work dir $WORK, mosquitto $P_MQTT, modbus $P_MODBUS"

# ---------------------------------------------------------------------------------------
# Peers

# Mosquitto's per-client queue must never be the narrower pipe: by default it keeps 20 QoS 1
# messages in flight to a client and queues 1000 more, and silently drops the rest. A flood
# of commands to the gateway (it reads them as fast as it can, answering `busy` past 32 per
# device) or of answers to the cloud then loses messages in the broker that the gateway
# never saw. So: at least the gateway's own bounds (its outbox holds 100,000 messages, 64
# in flight), the same as its embedded broker (session queue 200,000, 256 in flight). A
# real site's broker needs the same (or its cloud must pace its commands), or a flood is
# lost there, not in the gateway: with Mosquitto's defaults, 4,627 of the flood's 10,000 ids
# got no answer here, commands dropped on their way to the gateway and answers on their way
# to the cloud. No message_size_limit: the poison test needs a broker that forwards 2 MiB.
queue_settings() {
    cat <<EOF
max_queued_messages 200000
max_queued_bytes 0
max_inflight_messages 256
EOF
}
{
    mosquitto_globals
    queue_settings
    cat <<EOF
persistence false
listener $P_MQTT 127.0.0.1
allow_anonymous true
EOF
} >"$WORK/mosquitto.conf"
start_bg mosquitto "$WORK/mosquitto.log" "$MOSQUITTO" -c "$WORK/mosquitto.conf"
wait_until "mosquitto listening on $P_MQTT" 10 mosquitto tcp_open "$P_MQTT"

# The instance faults.py kills: persistence, saved after every change (autosave_on_changes
# with an interval of 1), so that what it acknowledged survives its SIGKILL as far as
# Mosquitto can make it; what it still loses is measured as its own loss.
mkdir -p "$WORK/kill-data"
{
    mosquitto_globals
    queue_settings
    cat <<EOF
persistence true
persistence_location $WORK/kill-data/
autosave_interval 1
autosave_on_changes true
listener $P_KILL 127.0.0.1
allow_anonymous true
EOF
} >"$WORK/mosquitto-kill.conf"

start_bg slave "$WORK/slave.log" "$PY" "$HERE/slave.py" --tcp "127.0.0.1:$P_MODBUS" \
    --writes "$WORK/writes.jsonl" --state "$WORK/state.json" --log-level warning
wait_until "slave ready" 20 slave test -s "$WORK/state.json"
touch "$WORK/writes.jsonl"

# ---------------------------------------------------------------------------------------
# Gateway configs

# gw_config NAME ADDRESS POLL CONNECTION_LINE...: $WORK/NAME.yaml, with connection `c` made
# of the lines and one pump on the slave whose writable point deviceAttrib.value is holding
# register ADDRESS (each test its own, so the write log tells them apart), polled every POLL
# with a full telemetry document each time (telemetry_interval = poll).
gw_config() {
    local name=$1 address=$2 poll=$3 line
    shift 3
    {
        echo "connections:"
        echo "  c:"
        for line in "$@"; do echo "    $line"; done
        cat <<EOF
buses:
  slave-line:
    tcp: { host: 127.0.0.1, port: $P_MODBUS }
    timeout: 500ms
    retries: 1
profiles:
  pump:
    points:
      deviceAttrib.value: { holding: $address, type: u16 }
      deviceData.temperature: { input: 0, type: i16, scale: 0.1 }
devices:
  pump:
    bus: slave-line
    unit: 1
    profile: pump
    poll: $poll
    twin:
      connection: c
      commands: faults/$name/cmd
      responses: faults/$name/rsp
      telemetry: faults/$name/telemetry
      telemetry_interval: $poll
state_dir: $WORK/state-$name
EOF
    } >"$WORK/$name.yaml"
}

M="url: mqtt://127.0.0.1:$P_MQTT"
gw_config flood-mosquitto 12 1s "$M" "client_id: faults-flood-mosquitto"
gw_config flood-embedded 13 1s "embedded: { listen: 127.0.0.1:$P_EMBEDDED }" "client_id: faults-flood-embedded"
gw_config poison-clean 14 1s "$M" "client_id: faults-poison-clean" "clean_session: true"
gw_config poison-persistent 15 1s "$M" "client_id: faults-poison-persistent" "clean_session: false"
# Through the relay to the Mosquitto that is killed; a persistent session, so what Mosquitto
# saved for the gateway (commands) survives with it.
gw_config broker-kill 16 500ms "url: mqtt://127.0.0.1:$P_RELAY_KILL" "client_id: faults-broker-kill" \
    "clean_session: false" "keep_alive: 5s" "reconnect: { min: 200ms, max: 1s }"
# Through a passive relay to the Mosquitto that stays up (the relay tells which commands had
# reached the gateway before a kill).
gw_config gateway-kill 17 1s "url: mqtt://127.0.0.1:$P_RELAY_GW" "client_id: faults-gateway-kill" \
    "clean_session: false" "reconnect: { min: 200ms, max: 1s }"
gw_config flaky 18 500ms "url: mqtt://127.0.0.1:$P_RELAY_FLAKY" "client_id: faults-flaky" \
    "clean_session: false" "keep_alive: 5s" "reconnect: { min: 200ms, max: 2s }"

# 20 devices on a line whose far end never answers (faults.py's blackhole), one live device.
{
    cat <<EOF
connections:
  c: { url: "mqtt://127.0.0.1:$P_MQTT", client_id: faults-sigterm }
buses:
  dead-line:
    tcp: { host: 127.0.0.1, port: $P_DEAD }
    timeout: 1s
    retries: 2
  slave-line:
    tcp: { host: 127.0.0.1, port: $P_MODBUS }
    timeout: 500ms
profiles:
  pump:
    points:
      deviceAttrib.value: { holding: 19, type: u16 }
devices:
  live:
    bus: slave-line
    unit: 1
    profile: pump
    twin: { connection: c, commands: faults/sigterm/live/cmd, responses: faults/sigterm/live/rsp }
EOF
    for ((i = 1; i <= 20; i++)); do
        cat <<EOF
  dead-$i:
    bus: dead-line
    unit: $i
    profile: pump
    twin: { connection: c, commands: faults/sigterm/dead-$i/cmd, responses: faults/sigterm/dead-$i/rsp }
EOF
    done
    echo "shutdown_timeout: 10s"
    echo "state_dir: $WORK/state-sigterm"
} >"$WORK/sigterm.yaml"

for f in "$WORK"/*.yaml; do
    out=$("$TWINBUS" check -c "$f" 2>&1) || die "twinbus check ${f##*/}" "$(head -c 600 <<<"$out")"
done

# ---------------------------------------------------------------------------------------
# The tests

FAULTS=("$PY" "$HERE/faults.py" --piddir "$PIDDIR" --work "$WORK" --twinbus "$TWINBUS" --writes "$WORK/writes.jsonl")

# run_test TEST NAME LABEL ARGS...: one faults.py test with config NAME.yaml, counted.
run_test() {
    local test=$1 name=$2 label=$3
    shift 3
    echo "faults: $label"
    counted "$name" "${FAULTS[@]}" "$test" "$name" "$label" --config "$WORK/$name.yaml" "$@" || FAILED_TESTS+=("$name")
}

if wanted flood; then
    run_test flood flood-mosquitto "flood via Mosquitto" --port "$P_MQTT" --address 12
    run_test flood flood-embedded "flood via the embedded broker" --port "$P_EMBEDDED" --address 13
fi
if wanted poison; then
    run_test poison poison-clean "poison, clean session" --port "$P_MQTT" --address 14
    run_test poison poison-persistent "poison, persistent session" --port "$P_MQTT" --address 15
fi
if wanted broker; then
    run_test broker broker-kill "Mosquitto kill -9 x10" --port "$P_KILL" --address 16 --poll 0.5 \
        --relay-port "$P_RELAY_KILL" --mosquitto "$MOSQUITTO" --mosquitto-conf "$WORK/mosquitto-kill.conf"
fi
if wanted gateway; then
    run_test gateway gateway-kill "gateway kill -9 x5" --port "$P_MQTT" --address 17 --relay-port "$P_RELAY_GW"
fi
if wanted flaky; then
    run_test flaky flaky "flaky link" --port "$P_MQTT" --address 18 --poll 0.5 --relay-port "$P_RELAY_FLAKY"
fi
if wanted sigterm; then
    run_test sigterm sigterm "SIGTERM with 20 dead devices" --port "$P_MQTT" --dead-port "$P_DEAD"
fi

finish
