#!/usr/bin/env bash
# Interoperability tests: twinbus against independent peers.
#   MQTT:   Mosquitto 2.0 (our own instance on a free loopback port, never the system one)
#   Modbus: pymodbus 3.16.1 as the slave, over Modbus TCP, over RTU on a socat pty pair and
#           over RTU frames on TCP (a serial device server, the gateway's `rtu_tcp` bus);
#           Node's modbus-serial 8 (ServerTCP) as a second, independent Modbus TCP slave that
#           gets the same checks
#
# Prerequisites (.ci/run installs them): mosquitto, mosquitto_sub/pub, socat, a venv with
# pymodbus at target/interop-venv (or INTEROP_PYTHON), node with modbus-serial under
# target/interop-node (or MODBUS_SERIAL_DIR), target/release/twinbus (or TWINBUS).
#
# Every check prints `ok   NAME` or `FAIL NAME: WHY`; the last line is
# `interop: N passed, N failed`. Exit status 1 if any check failed (or setup broke).
#
# Environment:
#   INTEROP_SKIP_GATEWAY=1  test the harness alone: no twinbus; a pymodbus client writes
#                           to both slaves instead and verifies their evidence files
#   INTEROP_KEEP=1          keep the work directory (configs, logs) after the run
#   RUST_LOG                passed to the gateway (default: info)
# shellcheck disable=SC2317 # failure_logs and its helper run from the EXIT trap
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/lib.sh"
begin interop interop
BAUD=19200

# After a failure: the peers' logs and the evidence files, without the noise unless the
# question is about framing or about the checks' own clients: pymodbus frame dumps (">>>>>")
# and mosquitto_pub's one-shot "auto-..." sessions.
failure_logs() {
    show_logs without_noise gateway.log mosquitto.log slave-tcp.log slave-rtu.log socat.log \
        slave-node.log slave-rtutcp.log writes-tcp.jsonl writes-rtu.jsonl writes-node.jsonl \
        writes-rtutcp.jsonl probe-tcp.txt probe-rtu.txt probe-node.txt
}
without_noise() { grep -v -e '^>>>>>' -e ' auto-' -e 'New connection from' "$1" | tail -n 40; }

# ---------------------------------------------------------------------------------------
# Preconditions

prerequisites "$MOSQUITTO" mosquitto_sub mosquitto_pub socat node

# Free loopback ports: the broker, and the three TCP slaves.
{ read -r MQTT_PORT && read -r MODBUS_PORT && read -r NODE_PORT && read -r RTUTCP_PORT; } < <(free_ports 4)
echo "interop: work dir $WORK, mqtt port $MQTT_PORT, modbus tcp port $MODBUS_PORT"

# ---------------------------------------------------------------------------------------
# Peers

# Mosquitto: its own config, loopback only.
{
    mosquitto_globals
    cat <<EOF
persistence false
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
EOF
} >"$WORK/mosquitto.conf"
start_bg mosquitto "$WORK/mosquitto.log" "$MOSQUITTO" -c "$WORK/mosquitto.conf"
wait_until "mosquitto listening on $MQTT_PORT" 10 mosquitto tcp_open "$MQTT_PORT"

# RTU line: a pty pair. The gateway opens ttyGW, the slave serves on ttySLAVE.
start_bg socat "$WORK/socat.log" socat -d -d \
    "pty,raw,echo=0,link=$WORK/ttyGW" "pty,raw,echo=0,link=$WORK/ttySLAVE"
wait_until "socat pty pair" 10 socat test -e "$WORK/ttyGW" -a -e "$WORK/ttySLAVE"

# Slaves: the state file appears once a slave is serving.
start_bg slave-tcp "$WORK/slave-tcp.log" "$PY" "$HERE/slave.py" \
    --tcp "127.0.0.1:$MODBUS_PORT" --writes "$WORK/writes-tcp.jsonl" --state "$WORK/state-tcp.json"
start_bg slave-rtu "$WORK/slave-rtu.log" "$PY" "$HERE/slave.py" \
    --rtu "$WORK/ttySLAVE" --baud "$BAUD" --writes "$WORK/writes-rtu.jsonl" --state "$WORK/state-rtu.json"
# RTU frames on TCP, as a serial device server in raw mode passes them on.
start_bg slave-rtutcp "$WORK/slave-rtutcp.log" "$PY" "$HERE/slave.py" \
    --rtu-tcp "127.0.0.1:$RTUTCP_PORT" --writes "$WORK/writes-rtutcp.jsonl" --state "$WORK/state-rtutcp.json"
# The second implementation, bounded on its own: a hung node never outlives the run.
start_bg slave-node "$WORK/slave-node.log" timeout -k 5 600 node "$HERE/slave.js" \
    --tcp "127.0.0.1:$NODE_PORT" --writes "$WORK/writes-node.jsonl" --state "$WORK/state-node.json"
wait_until "tcp slave ready" 20 slave-tcp test -s "$WORK/state-tcp.json"
wait_until "rtu slave ready" 20 slave-rtu test -s "$WORK/state-rtu.json"
wait_until "rtu-over-tcp slave ready" 20 slave-rtutcp test -s "$WORK/state-rtutcp.json"
wait_until "node slave ready" 20 slave-node test -s "$WORK/state-node.json"
touch "$WORK/writes-tcp.jsonl" "$WORK/writes-rtu.jsonl" "$WORK/writes-node.jsonl" "$WORK/writes-rtutcp.jsonl"

if [[ $SKIP_GATEWAY == 1 ]]; then
    # Harness self-test: pymodbus's client plays the gateway's part, writes included.
    echo "interop: INTEROP_SKIP_GATEWAY=1, testing the peers with a pymodbus client instead of twinbus"
    counted probe-tcp "$PY" "$HERE/probe.py" --tcp "127.0.0.1:$MODBUS_PORT" --name tcp-slave \
        --writes "$WORK/writes-tcp.jsonl" --state "$WORK/state-tcp.json" || true
    counted probe-rtu "$PY" "$HERE/probe.py" --rtu "$WORK/ttyGW" --baud "$BAUD" --name rtu-slave \
        --writes "$WORK/writes-rtu.jsonl" --state "$WORK/state-rtu.json" || true
    # The broker half of the harness: subscribe, publish, match an answer by id.
    counted checks "$PY" "$HERE/checks.py" --mqtt-port "$MQTT_PORT" --piddir "$PIDDIR" --selftest || true
    finish
fi

# Before the gateway: make sure the peers answer a client that is not twinbus (reads only,
# so the write logs stay empty for the gateway checks). One counted check per slave; the
# detail goes to probe-*.txt, shown on failure.
for line in tcp rtu node; do
    if [[ $line == tcp ]]; then
        where=(--tcp "127.0.0.1:$MODBUS_PORT")
    elif [[ $line == node ]]; then
        # modbus-serial serves unit 1 only and stays silent for the others.
        where=(--tcp "127.0.0.1:$NODE_PORT" --silent-units)
    else
        where=(--rtu "$WORK/ttyGW" --baud "$BAUD")
    fi
    if "$PY" "$HERE/probe.py" "${where[@]}" --name "$line-slave" --read-only >"$WORK/probe-$line.txt" 2>&1; then
        record "$line slave answers a pymodbus client"
    else
        record "$line slave answers a pymodbus client" "$(grep -m1 '^FAIL' "$WORK/probe-$line.txt" || tail -n1 "$WORK/probe-$line.txt")"
    fi
done

# ---------------------------------------------------------------------------------------
# Gateway config

CONFIG=$WORK/interop.yaml
cat >"$CONFIG" <<EOF
connections:
  ci:
    url: mqtt://127.0.0.1:$MQTT_PORT
    client_id: twinbus-interop
buses:
  tcp-line:
    tcp: { host: 127.0.0.1, port: $MODBUS_PORT }
    timeout: 500ms
    retries: 1
  rtu-line:
    rtu: { port: $WORK/ttyGW, baud: $BAUD, parity: none, data_bits: 8, stop_bits: 1 }
    timeout: 500ms
    retries: 1
  node-line:
    tcp: { host: 127.0.0.1, port: $NODE_PORT }
    timeout: 500ms
    retries: 1
  rtutcp-line:
    rtu_tcp: { host: 127.0.0.1, port: $RTUTCP_PORT, baud: $BAUD }
    timeout: 500ms
    retries: 1
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint: { holding: 10, type: f32, min: 0, max: 80 }
      deviceData.temperature: { input: 0, type: i16, scale: 0.1, deadband: 0.2 }
      deviceData.running: { discrete: 0 }
      deviceAttrib.lamp: { holding: 20, bit: 3 }
devices:
  tcp-pump:
    bus: tcp-line
    unit: 1
    profile: pump
    mask_write: true
    poll: 500ms
    twin:
      connection: ci
      commands: ci/tcp-pump/cmd
      responses: ci/tcp-pump/rsp
      telemetry: ci/tcp-pump/telemetry
      telemetry_interval: 2s
  rtu-pump:
    bus: rtu-line
    unit: 1
    profile: pump
    poll: 500ms
    twin:
      connection: ci
      commands: ci/rtu-pump/cmd
      responses: ci/rtu-pump/rsp
      telemetry: ci/rtu-pump/telemetry
      telemetry_interval: 2s
  node-pump:
    bus: node-line
    unit: 1
    profile: pump
    poll: 500ms
    twin:
      connection: ci
      commands: ci/node-pump/cmd
      responses: ci/node-pump/rsp
      telemetry: ci/node-pump/telemetry
      telemetry_interval: 2s
  rtutcp-pump:
    bus: rtutcp-line
    unit: 1
    profile: pump
    poll: 500ms
    twin:
      connection: ci
      commands: ci/rtutcp-pump/cmd
      responses: ci/rtutcp-pump/rsp
      telemetry: ci/rtutcp-pump/telemetry
      telemetry_interval: 2s
EOF

# `twinbus check`: the real config passes; broken copies fail with exit 1 and point at the
# offending line as FILE:LINE:.
out=$("$TWINBUS" check -c "$CONFIG" 2>&1) && rc=0 || rc=$?
if ((rc == 0)); then
    record "check accepts the interop config"
else
    record "check accepts the interop config" "exit $rc: $(head -c 600 <<<"$out")"
fi

# check_broken NAME SED_EXPR MARKER: apply SED_EXPR to a copy; MARKER finds the broken line.
check_broken() {
    local name=$1 expr=$2 marker=$3 file line out rc
    file=$WORK/broken-$name.yaml
    sed -e "$expr" "$CONFIG" >"$file"
    line=$(grep -n -m1 -e "$marker" "$file" | cut -d: -f1)
    [[ -n $line ]] || die "broken config $name" "sed expression matched nothing"
    out=$("$TWINBUS" check -c "$file" 2>&1) && rc=0 || rc=$?
    if ((rc != 1)); then
        record "check rejects $name (exit 1)" "exit $rc: $(head -c 600 <<<"$out")"
    elif ! grep -qF "broken-$name.yaml:$line:" <<<"$out"; then
        record "check rejects $name (exit 1)" "no 'broken-$name.yaml:$line:' in: $(head -c 600 <<<"$out")"
    else
        record "check rejects $name (exit 1) at broken-$name.yaml:$line"
    fi
}
# A value the schema cannot accept (a type that does not exist).
check_broken bad-type 's/type: f32/type: f99/' 'type: f99'
# A reference the schema accepts but the model cannot resolve (semantic validation).
check_broken unknown-bus '/^  rtu-pump:/,/^    bus:/s/bus: rtu-line/bus: no-such-line/' 'bus: no-such-line'

# ---------------------------------------------------------------------------------------
# Gateway run

export RUST_LOG=${RUST_LOG:-info}
start_bg gateway "$WORK/gateway.log" "$TWINBUS" run -c "$CONFIG"
sleep 0.5
alive gateway || die "gateway start" "exited at once (see gateway.log)"

counted checks "$PY" "$HERE/checks.py" --mqtt-port "$MQTT_PORT" --piddir "$PIDDIR" \
    --device "tcp-pump:$WORK/writes-tcp.jsonl:$WORK/state-tcp.json" \
    --device "rtu-pump:$WORK/writes-rtu.jsonl:$WORK/state-rtu.json" \
    --device "node-pump:$WORK/writes-node.jsonl:$WORK/state-node.json" \
    --device "rtutcp-pump:$WORK/writes-rtutcp.jsonl:$WORK/state-rtutcp.json" --mask-write tcp-pump || true

# Graceful stop: SIGTERM must end the gateway with status 0, promptly.
if alive gateway; then
    stop gateway && rc=0 || rc=$?
    if ((rc == 0)); then
        record "gateway exits 0 on SIGTERM"
    else
        record "gateway exits 0 on SIGTERM" "exit status $rc"
    fi
else
    wait "$(pid_of gateway)" && rc=0 || rc=$?
    rm -f "$PIDDIR/gateway"
    record "gateway still running after the checks" "it exited with status $rc"
fi

finish
