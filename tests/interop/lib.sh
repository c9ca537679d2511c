# shellcheck shell=bash
# What the interop scripts (run.sh, connections.sh) share: results, background processes,
# the cleanup on exit, waits. Sourced, not run:
#
#   HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
#   source "$HERE/lib.sh"
#   begin LABEL SUMMARY
#
# The script defines `failure_logs`, which calls `show_logs` with the logs worth reading
# after a failure, and ends on purpose with `finish` (or `die`). Every check prints
# `ok   NAME` or `FAIL NAME: WHY`, and the last line is `SUMMARY: N passed, N failed`:
# .ci/run parses both, so their shape is fixed.
# shellcheck disable=SC2317 # functions run from traps and through wait_until

ROOT=$(cd "$HERE/../.." && pwd)
PY=${INTEROP_PYTHON:-$ROOT/target/interop-venv/bin/python}
TWINBUS=${TWINBUS:-$ROOT/target/release/twinbus}
SKIP_GATEWAY=${INTEROP_SKIP_GATEWAY:-0}
# mosquitto lives in /usr/sbin, which a non-login PATH may lack.
# shellcheck disable=SC2034 # for the scripts that source this file
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# begin LABEL SUMMARY: the work dir, the results file, and the traps. LABEL prefixes the
# script's own messages and names its work dir; SUMMARY starts the last line.
begin() {
    LABEL=$1 SUMMARY=$2
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/twinbus-$LABEL.XXXXXX")
    PIDDIR=$WORK/pids          # one file per background process: name -> pid
    RESULTS=$WORK/results.txt  # every ok/FAIL line (and what check programs print), counted at the end
    FINISHED=0                 # set when the script ends on purpose: anything else is an abort
    mkdir -p "$PIDDIR"
    : >"$RESULTS"
    trap cleanup EXIT
    # Turn signals into a normal exit so the EXIT trap cleans up.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

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
    FINISHED=1
    exit 1
}

# The script is done; cleanup counts and sets the exit status (1 if any check failed).
finish() {
    FINISHED=1
    exit 0
}

# prerequisites TOOL...: the venv's python, each TOOL, and the gateway binary unless the
# harness runs alone.
prerequisites() {
    local bin
    [[ -x $PY ]] || die "python venv" "$PY missing (run .ci/run, or set INTEROP_PYTHON)"
    for bin in "$@"; do
        command -v "$bin" >/dev/null || die "tools" "$bin not found"
    done
    if [[ $SKIP_GATEWAY != 1 && ! -x $TWINBUS ]]; then
        die "gateway binary" "$TWINBUS missing (cargo build --release)"
    fi
}

# ---------------------------------------------------------------------------------------
# Processes: every background process is started through start_bg (or counted) and recorded
# in PIDDIR, and the EXIT trap stops exactly those (plus any pid file the check programs
# leave there). start_bg runs each one in a session (and process group) of its own, so that
# stopping it also reaches anything it spawned, without touching the process group CI runs
# us in.

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

# stop NAME [SIGNAL]: SIGNAL (default TERM), up to 5 s grace, then SIGKILL; then SIGKILL
# whatever is left of its process group. Returns the process's exit status when it is our
# child.
stop() {
    local name=$1 sig=${2:-TERM} pid target i
    pid=$(pid_of "$name")
    [[ -n $pid ]] || return 0
    rm -f "$PIDDIR/$name"
    # Our own start_bg processes lead their group; a pid file from a check program does not.
    target=$pid
    if [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]]; then
        target=-$pid
    fi
    kill "-$sig" -- "$target" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        echo "$LABEL: $name (pid $pid) ignored SIG$sig for 5 s, killing it" >&2
    fi
    [[ $target == -* ]] && kill -KILL -- "$target" 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
    # `wait` only knows our own children (not a check program's mosquitto_sub). The braces
    # send bash's own "Killed" notice to the redirected stderr too.
    { wait "$pid"; } 2>/dev/null
}

# show_logs SHOW FILE...: for the script's failure_logs. The tail of each FILE (relative to
# WORK unless absolute) that is not empty, under a header, as the function SHOW prints it.
show_logs() {
    local show=$1 f
    shift
    for f in "$@"; do
        [[ $f == /* ]] || f=$WORK/$f
        [[ -s $f ]] || continue
        echo "----- tail of ${f#"$WORK"/} -----"
        "$show" "$f"
    done
    echo "----- end of logs (work dir: $WORK) -----"
}

cleanup() {
    local rc=$? name passed failed
    set +e
    trap - EXIT INT TERM
    # Gateways first, so they do not log a storm of errors about peers going away.
    for name in "$PIDDIR"/gateway "$PIDDIR"/gw-* "$PIDDIR"/*; do
        [[ -e $name ]] && stop "${name##*/}"
    done
    passed=$(grep -c '^ok ' "$RESULTS")
    failed=$(grep -c '^FAIL ' "$RESULTS")
    if ((rc != 0 && FINISHED == 0)); then
        # Stopped by something other than a check (a signal, an unexpected command error).
        record "$LABEL run" "aborted with status $rc (checks after this point did not run)"
        failed=$((failed + 1))
    fi
    ((failed == 0)) || failure_logs
    # What the check programs measured, again where a reader of the summary looks.
    grep '^     MEASURED ' "$RESULTS" | sed "s/^     MEASURED /$LABEL: measured: /"
    if [[ ${INTEROP_KEEP:-0} == 1 ]]; then
        echo "$LABEL: work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    echo "$SUMMARY: $passed passed, $failed failed"
    if ((failed > 0 && rc == 0)); then rc=1; fi
    exit "$rc"
}

# ---------------------------------------------------------------------------------------
# Waits and checks

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

# counted NAME CMD...: run a check program whose ok/FAIL lines count; returns its exit
# status. All it prints goes to RESULTS too, so its `     MEASURED ...` lines can be
# repeated at the end. It runs in the background and we `wait` for it, because bash runs the
# signal traps only once a foreground command has finished: this way a SIGTERM/SIGINT stops
# everything at once. Its own process group (setsid) lets stop() end the program, its tee and
# its children together; waiting for the whole pipeline means every line is in RESULTS when
# we go on.
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
    return "$rc"
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_ports N: N free loopback ports, one a line, all bound at once so none comes twice.
free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks), sep="\n")
EOF
}

# mosquitto_globals: the settings every Mosquitto of ours shares; a config adds its
# listeners. TCP_NODELAY, or small answers wait ≈ 40 ms in the kernel (Nagle + delayed ACK).
# `user root` avoids the drop to the mosquitto user, which could not read the 0700 work dir
# (and may not exist on a bare machine). The log says who connected, for the checks that
# count connections and for failure_logs.
mosquitto_globals() {
    cat <<EOF
set_tcp_nodelay true
user root
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %H:%M:%S
EOF
}
