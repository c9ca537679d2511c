#!/usr/bin/env bash
# Interoperability tests: twinbus against independent peers.
#   MQTT:   Mosquitto 2.0 (our own instance on a free loopback port, never the system one)
#   Modbus: pymodbus 3.16.1 as the slave, over Modbus TCP and over RTU on a socat pty pair
#
# Prerequisites (.ci/run installs them): mosquitto, mosquitto_sub/pub, socat, a venv with
# pymodbus at target/interop-venv (or INTEROP_PYTHON), target/release/twinbus (or TWINBUS).
#
# Every check prints `ok   NAME` or `FAIL NAME: WHY`; the last line is
# `interop: N passed, N failed`. Exit status 1 if any check failed (or setup broke).
#
# Environment:
#   INTEROP_SKIP_GATEWAY=1  test the harness alone: no twinbus; a pymodbus client writes
#                           to both slaves instead and verifies their evidence files
#   INTEROP_KEEP=1          keep the work directory (configs, logs) after the run
#   RUST_LOG                passed to the gateway (default: info)
# shellcheck disable=SC2317 # functions run from traps and through wait_until
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${INTEROP_PYTHON:-$ROOT/target/interop-venv/bin/python}
TWINBUS=${TWINBUS:-$ROOT/target/release/twinbus}
SKIP_GATEWAY=${INTEROP_SKIP_GATEWAY:-0}
BAUD=19200

# mosquitto lives in /usr/sbin, which a non-login PATH may lack.
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/twinbus-interop.XXXXXX")
PIDDIR=$WORK/pids          # one file per background process: name -> pid
RESULTS=$WORK/results.txt  # every ok/FAIL line, counted at the end
mkdir -p "$PIDDIR"
: >"$RESULTS"

# ---------------------------------------------------------------------------------------
# Results

# record NAME [WHY]: without WHY the check passed.
record() {
    if [[ $# -eq 1 ]]; then
        echo "ok   $1" | tee -a "$RESULTS"
    else
        echo "FAIL $1: $2" | tee -a "$RESULTS"
    fi
}

# A setup step failed: nothing after it can be meaningful. Counted as a failed check so the
# summary never reads "0 failed" for a run that did not get to its checks.
die() {
    record "setup: $1" "${2:-failed}"
    exit 1
}

# ---------------------------------------------------------------------------------------
# Processes: every background process is started through start_bg and recorded in PIDDIR,
# and the EXIT trap stops exactly those (plus any pid file checks.py leaves there).
# start_bg runs each one in a session (and process group) of its own, so that stopping it
# also reaches anything it spawned, without touching the process group CI runs us in.

start_bg() { # start_bg NAME LOGFILE CMD...
    local name=$1 logfile=$2
    shift 2
    # From a non-interactive shell the job is not a group leader, so setsid execs in place:
    # $! is the command itself (its exit status stays ours to `wait` for).
    setsid "$@" </dev/null >"$logfile" 2>&1 &
    echo $! >"$PIDDIR/$name"
}

pid_of() { cat "$PIDDIR/$1" 2>/dev/null || true; }

# running PID: exists and is not a zombie. (A process whose parent we killed is a zombie
# until pid 1 reaps it, and some container inits never do.)
running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

alive() { # alive NAME
    local pid
    pid=$(pid_of "$1")
    [[ -n $pid ]] && running "$pid"
}

# stop NAME: SIGTERM, up to 5 s grace, then SIGKILL; then SIGKILL whatever is left of its
# process group. Returns the process's exit status when it is our child.
stop() {
    local name=$1 pid target i
    pid=$(pid_of "$name")
    [[ -n $pid ]] || return 0
    rm -f "$PIDDIR/$name"
    # Our own start_bg processes lead their group; a pid file from checks.py does not.
    target=$pid
    if [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]]; then
        target=-$pid
    fi
    kill -TERM -- "$target" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        echo "interop: $name (pid $pid) ignored SIGTERM for 5 s, killing it" >&2
    fi
    [[ $target == -* ]] && kill -KILL -- "$target" 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
    # `wait` only knows our own children (not checks.py's mosquitto_sub).
    wait "$pid" 2>/dev/null
}

show_logs() {
    local f
    for f in gateway.log mosquitto.log slave-tcp.log slave-rtu.log socat.log \
        writes-tcp.jsonl writes-rtu.jsonl probe-tcp.txt probe-rtu.txt; do
        [[ -s $WORK/$f ]] || continue
        echo "----- tail of $f -----"
        # Noise unless the question is about framing or about the checks' own clients:
        # pymodbus frame dumps (">>>>>") and mosquitto_pub's one-shot "auto-..." sessions.
        grep -v -e '^>>>>>' -e ' auto-' -e 'New connection from' "$WORK/$f" | tail -n 40
    done
    echo "----- end of logs (work dir: $WORK) -----"
}

cleanup() {
    local rc=$? name passed failed
    set +e
    trap - EXIT INT TERM
    # The gateway first, so it does not log a storm of errors about peers going away.
    for name in gateway $(ls "$PIDDIR" 2>/dev/null); do
        stop "$name"
    done
    passed=$(grep -c '^ok ' "$RESULTS")
    failed=$(grep -c '^FAIL ' "$RESULTS")
    if ((rc != 0 && failed == 0)); then
        # Stopped by something other than a check (a signal, an unexpected command error).
        record "interop run" "aborted with status $rc"
        failed=$((failed + 1))
    fi
    ((failed == 0)) || show_logs
    if [[ ${INTEROP_KEEP:-0} == 1 ]]; then
        echo "interop: work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    echo "interop: $passed passed, $failed failed"
    if ((failed > 0 && rc == 0)); then rc=1; fi
    exit "$rc"
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap cleans up.
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_until DESCRIPTION SECONDS PROCESS_NAME CMD...: poll CMD every 0.1 s; give up early if
# the process that should make it true has died.
wait_until() {
    local what=$1 secs=$2 proc=$3 i
    shift 3
    for ((i = 0; i < secs * 10; i++)); do
        "$@" && return 0
        if [[ -n $proc ]] && ! alive "$proc"; then
            die "$what" "$proc exited early (see its log)"
        fi
        sleep 0.1
    done
    die "$what" "not within $secs s"
}

# counted NAME CMD...: run a check program whose ok/FAIL lines count. It runs in the
# background and we `wait` for it, because bash runs the signal traps only once a
# foreground command has finished: this way a SIGTERM/SIGINT stops everything at once.
# Its own process group (setsid) lets stop() end the program, its tee and its children
# together; waiting for the whole pipeline means every line is in RESULTS when we go on.
counted() {
    local name=$1 rc fails_before
    shift
    fails_before=$(grep -c '^FAIL ' "$RESULTS" || true)
    # The wrapper shell traps TERM (rather than dying of it) so that it outlives and reaps
    # the pipeline; orphans would stay zombies where pid 1 does not reap.
    # shellcheck disable=SC2016 # expanded by the inner shell
    setsid bash -c 'trap : TERM; "${@:2}" | tee -a "$1"; exit "${PIPESTATUS[0]}"' \
        counted "$RESULTS" "$@" </dev/null &
    echo $! >"$PIDDIR/$name"
    wait $! && rc=0 || rc=$?
    rm -f "$PIDDIR/$name"
    # A crash (a traceback instead of FAIL lines) must not pass for success.
    if ((rc != 0)) && (($(grep -c '^FAIL ' "$RESULTS" || true) == fails_before)); then
        record "$name" "exited with status $rc without reporting a failed check"
    fi
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------
# Preconditions

[[ -x $PY ]] || die "python venv" "$PY missing (run .ci/run, or set INTEROP_PYTHON)"
for bin in "$MOSQUITTO" mosquitto_sub mosquitto_pub socat; do
    command -v "$bin" >/dev/null || die "tools" "$bin not found"
done
if [[ $SKIP_GATEWAY != 1 && ! -x $TWINBUS ]]; then
    die "gateway binary" "$TWINBUS missing (cargo build --release)"
fi

# Two free loopback ports, taken while both are held so they cannot be the same one.
read -r MQTT_PORT MODBUS_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
echo "interop: work dir $WORK, mqtt port $MQTT_PORT, modbus tcp port $MODBUS_PORT"

# ---------------------------------------------------------------------------------------
# Peers

# Mosquitto: its own config, loopback only. `user root` avoids the drop to the mosquitto
# user, which could not read this 0700 work dir (and may not exist on a bare machine).
cat >"$WORK/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
user root
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %H:%M:%S
EOF
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
wait_until "tcp slave ready" 20 slave-tcp test -s "$WORK/state-tcp.json"
wait_until "rtu slave ready" 20 slave-rtu test -s "$WORK/state-rtu.json"
touch "$WORK/writes-tcp.jsonl" "$WORK/writes-rtu.jsonl"

if [[ $SKIP_GATEWAY == 1 ]]; then
    # Harness self-test: pymodbus's client plays the gateway's part, writes included.
    echo "interop: INTEROP_SKIP_GATEWAY=1, testing the peers with a pymodbus client instead of twinbus"
    counted probe-tcp "$PY" "$HERE/probe.py" --tcp "127.0.0.1:$MODBUS_PORT" --name tcp-slave \
        --writes "$WORK/writes-tcp.jsonl" --state "$WORK/state-tcp.json"
    counted probe-rtu "$PY" "$HERE/probe.py" --rtu "$WORK/ttyGW" --baud "$BAUD" --name rtu-slave \
        --writes "$WORK/writes-rtu.jsonl" --state "$WORK/state-rtu.json"
    # The broker half of the harness: subscribe, publish, match an answer by id.
    counted checks "$PY" "$HERE/checks.py" --mqtt-port "$MQTT_PORT" --piddir "$PIDDIR" --selftest
    exit 0
fi

# Before the gateway: make sure the peers answer a client that is not twinbus (reads only,
# so the write logs stay empty for the gateway checks). One counted check per slave; the
# detail goes to probe-*.txt, shown on failure.
for line in tcp rtu; do
    if [[ $line == tcp ]]; then
        where=(--tcp "127.0.0.1:$MODBUS_PORT")
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
    --device "rtu-pump:$WORK/writes-rtu.jsonl:$WORK/state-rtu.json" --mask-write tcp-pump

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

grep -q '^FAIL ' "$RESULTS" && exit 1
exit 0
