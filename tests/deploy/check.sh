#!/usr/bin/env bash
# Deployment checks, run by .ci/run after `cargo deb`:
#   bash tests/deploy/check.sh target/debian/twinbus_VERSION-1_ARCH.deb
# 1. deploy/twinbus.service: `systemd-analyze security` exposure at most 2.0 (where
#    systemd-analyze exists; otherwise its hardening directives are listed).
# 2. The .deb: its contents (`dpkg-deb -c`) and control data (`dpkg-deb -I`), printed and
#    checked: paths, owners, modes, the conffile, dependencies, a stripped binary, the unit as
#    in the repository, and maintainer scripts that create the user and own the config.
# 3. The gateway under strace (demo config + an RTU line on a pseudo-terminal): the system
#    calls and socket families it uses pass the unit's SystemCallFilter= and
#    RestrictAddressFamilies=.
# 4. As root, both install recipes for real: `dpkg -i` (twice: the upgrade path) then
#    `dpkg --purge`, and deploy/install.sh; after each, the service user exists, is in dialout,
#    and can read its config (`twinbus check` as that user) while others cannot. Each install
#    is undone (the package by purge, which keeps the user by design; then the user too if it
#    did not exist before). Skipped, with a note, when not root, when DEPLOY_INSTALL=0, or when
#    twinbus is already installed on this machine (a real installation is never touched).
# Prints `ok NAME` / `FAIL NAME: WHY` lines; the last line is `deploy: N passed, N failed`.
# Nothing here runs the gateway: tests/systemd.rs (cargo test) covers READY/WATCHDOG/STOPPING.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/interop/lib.sh
source "$HERE/../interop/lib.sh"
# shellcheck disable=SC2317 # called from lib.sh's cleanup
failure_logs() { show_logs tail deb-info.txt install.log gateway.log used.txt; }
begin deploy deploy

DEB=${1:-}
UNIT=${DEPLOY_UNIT:-$ROOT/deploy/twinbus.service}  # DEPLOY_UNIT: to see a check fail
[[ -n $DEB && -f $DEB ]] || die "package" "no .deb given (bash tests/deploy/check.sh FILE.deb)"

# expect NAME CMD...: ok when CMD succeeds.
expect() {
    local name=$1
    shift
    if "$@" >>"$WORK/install.log" 2>&1; then record "$name"; else record "$name" "failed: $*"; fi
}

# owner_mode PATH: `user group octal-mode`.
owner_mode() { stat -c '%U %G %a' "$1" 2>/dev/null || echo "missing"; }

# expect_owner_mode NAME PATH WANT
expect_owner_mode() {
    local got
    got=$(owner_mode "$2")
    if [[ $got == "$3" ]]; then record "$1"; else record "$1" "$2 is '$got', want '$3'"; fi
}

# ---------------------------------------------------------------------------------------
# 1. Hardening of the unit.
if command -v systemd-analyze >/dev/null; then
    report=$(systemd-analyze security --offline=true "$UNIT" 2>&1 || true)
    score=$(sed -n 's/.*Overall exposure level for twinbus.service: \([0-9.]*\).*/\1/p' <<<"$report")
    echo "deploy: systemd-analyze security --offline=true deploy/twinbus.service: ${score:-?} ($(systemd-analyze --version | head -n 1))"
    if [[ -n $score ]] && systemd-analyze security --offline=true --threshold=20 "$UNIT" >/dev/null 2>&1; then
        record "unit: systemd-analyze security exposure $score (at most 2.0)"
    else
        record "unit: systemd-analyze security exposure" "${score:-no score} is above 2.0 (or the check failed)"
        grep '✗' <<<"$report" || echo "$report"
    fi
else
    echo "deploy: systemd-analyze not found (apt-get install systemd); the unit's hardening directives:"
    grep -E '^(Protect|Private|Restrict|Device|Capability|Ambient|NoNew|SystemCall|Lock|Memory|RemoveIPC|UMask|State)' "$UNIT"
fi

# ---------------------------------------------------------------------------------------
# 2. The package's contents and control data.
dpkg-deb -c "$DEB" >"$WORK/deb-contents.txt"
dpkg-deb -I "$DEB" >"$WORK/deb-info.txt"
echo "deploy: dpkg-deb -c ${DEB##*/}"
cat "$WORK/deb-contents.txt"
echo "deploy: dpkg-deb -I ${DEB##*/}"
cat "$WORK/deb-info.txt"

# has_entry NAME MODE PATH: a file in the package with this mode string, owned by root
# (dpkg-deb -c shows 0/0 or root/root).
has_entry() {
    if awk -v m="$2" -v p="$3" '$1 == m && ($2 == "0/0" || $2 == "root/root") && $NF == p { found = 1 } END { exit !found }' "$WORK/deb-contents.txt"; then
        record "$1"
    else
        record "$1" "no '$2 0/0 $3' in dpkg-deb -c"
    fi
}
has_entry "deb: the binary, /usr/bin/twinbus 0755" -rwxr-xr-x ./usr/bin/twinbus
has_entry "deb: the unit, /usr/lib/systemd/system/twinbus.service 0644" -rw-r--r-- ./usr/lib/systemd/system/twinbus.service
has_entry "deb: the example config, /etc/twinbus/gateway.yaml 0640" -rw-r----- ./etc/twinbus/gateway.yaml
has_entry "deb: the copyright file" -rw-r--r-- ./usr/share/doc/twinbus/copyright

mkdir -p "$WORK/ctrl" "$WORK/root"
dpkg-deb -e "$DEB" "$WORK/ctrl"
dpkg-deb -x "$DEB" "$WORK/root"
expect "deb: /etc/twinbus/gateway.yaml is a conffile" grep -qx /etc/twinbus/gateway.yaml "$WORK/ctrl/conffiles"
expect "deb: the unit is deploy/twinbus.service as committed" cmp "$UNIT" "$WORK/root/usr/lib/systemd/system/twinbus.service"
expect "deb: the example config is the demo gateway.yaml" cmp "$ROOT/gateway.yaml" "$WORK/root/etc/twinbus/gateway.yaml"
depends=$(dpkg-deb -f "$DEB" Depends)
if [[ $depends == *adduser* && $depends == *libc6* ]]; then
    record "deb: depends on adduser and libc6 ($depends)"
else
    record "deb: depends on adduser and libc6" "Depends: $depends"
fi
if readelf -S "$WORK/root/usr/bin/twinbus" | grep -qE '\.(symtab|debug_info)'; then
    record "deb: the binary is stripped" "it still has a symbol table or debug info"
else
    record "deb: the binary is stripped ($(stat -c %s "$WORK/root/usr/bin/twinbus") bytes)"
fi
expect "deb: postinst creates the system user twinbus" grep -q 'adduser --system --group' "$WORK/ctrl/postinst"
expect "deb: postinst puts twinbus in dialout" grep -q 'adduser --quiet twinbus dialout' "$WORK/ctrl/postinst"
expect "deb: postinst makes the config root:twinbus" grep -q 'dpkg-statoverride --update --add root twinbus' "$WORK/ctrl/postinst"
# cargo-deb's "don't enable, don't start" fragments: enable only what was enabled before an
# upgrade, and try-restart (restart only if running).
expect "deb: the service is neither enabled nor started on install" bash -c "grep -q 'was-enabled twinbus.service' '$WORK/ctrl/postinst' && ! grep -qE 'deb-systemd-invoke (start|restart) ' '$WORK/ctrl/postinst'"
if command -v shellcheck >/dev/null; then
    for script in preinst postinst prerm postrm; do
        [[ -f $WORK/ctrl/$script ]] || continue
        expect "deb: $script passes shellcheck" shellcheck -s sh "$WORK/ctrl/$script"
    done
fi

# ---------------------------------------------------------------------------------------
# 3. The gateway under strace: every system call it makes is one that the unit's
#    SystemCallFilter= lets through, and every socket it opens is of a family that
#    RestrictAddressFamilies= allows. It runs the demo (embedded broker, simulator, HTTP
#    listener, on free ports) plus an RTU line on a pseudo-terminal, answers a command, serves
#    /readyz, and stops on SIGTERM.

# syscall_group @GROUP: its system calls, nested groups expanded.
syscall_group() {
    local body g
    body=$(systemd-analyze syscall-filter "$1" | tail -n +2 | grep -vE '^\s*#' | awk 'NF { print $1 }')
    grep -v '^@' <<<"$body" || true
    for g in $(grep '^@' <<<"$body" || true); do
        syscall_group "$g"
    done
}
# unit_words KEY [~]: the words of every KEY= line of the unit (with ~: only the negated ones).
unit_words() {
    sed -n "s/^$1=${2:-}//p" "$UNIT" | grep -v '^~' | tr ' ' '\n' | awk 'NF' || true
}
# readyz PORT: GET /readyz answers 200 (a subshell: a refused connection must not end us).
# shellcheck disable=SC2317 # called through wait_until
readyz() {
    (exec 8<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&8 && head -n 1 <&8 | grep -q ' 200 ') 2>/dev/null
}
missing_tools=""
for tool in strace systemd-analyze socat mosquitto_pub; do
    command -v "$tool" >/dev/null || missing_tools+=" $tool"
done
[[ -x $PY ]] || PY=$(command -v python3)
if [[ -n $missing_tools ]]; then
    echo "deploy: the system-call check skipped: missing$missing_tools"
elif [[ ! -x $TWINBUS ]]; then
    record "strace: the gateway binary" "$TWINBUS missing (cargo build --release)"
else
    mapfile -t ports < <(free_ports 3)
    start_bg socat "$WORK/socat.log" socat pty,raw,echo=0,link="$WORK/ttyA" pty,raw,echo=0,link="$WORK/ttyB"
    wait_until "the pseudo-terminal pair" 10 socat test -e "$WORK/ttyA"
    sed -e "s/127.0.0.1:1883/127.0.0.1:${ports[0]}/; s/port: 5020/port: ${ports[1]}/" \
        -e "s/127.0.0.1:5020/127.0.0.1:${ports[1]}/; s/127.0.0.1:9180/127.0.0.1:${ports[2]}/" \
        -e "s|^buses:|buses:\n  rtu-line: { rtu: { port: $WORK/ttyA, baud: 9600, parity: none }, timeout: 100ms }|" \
        -e "s|^devices:|devices:\n  rtu-pump: { bus: rtu-line, unit: 2, profile: pump, twin: { connection: local, telemetry: rtu/telemetry } }|" \
        "$ROOT/gateway.yaml" >"$WORK/gateway.yaml"
    echo "state_dir: $WORK/state" >>"$WORK/gateway.yaml"
    # systemd's end of the notification socket, so that the trace covers sd_notify too.
    start_bg notify "$WORK/notify.log" "$PY" -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
while True:
    print(s.recv(4096).decode().replace("\n", " "))' "$WORK/notify"
    wait_until "the notification socket" 10 notify test -S "$WORK/notify"
    start_bg gateway "$WORK/gateway.log" env NOTIFY_SOCKET="$WORK/notify" WATCHDOG_USEC=1000000 \
        strace -f -qq -o "$WORK/trace" "$TWINBUS" run -c "$WORK/gateway.yaml"
    wait_until "the gateway under strace is ready" 60 gateway readyz "${ports[2]}"
    mosquitto_pub -h 127.0.0.1 -p "${ports[0]}" -t iot/v1/cmd -m '{"id":"strace-1","set":{"deviceAttrib":{"motorStatus":"on"}}}'
    sleep 2
    # SIGTERM to the gateway itself (strace's child), so that the trace covers its shutdown.
    kill -TERM "$(ps -o pid= --ppid "$(pid_of gateway)" | head -n 1)" 2>/dev/null || true
    wait_until "the gateway stops on SIGTERM" 20 "" bash -c "! kill -0 $(pid_of gateway) 2>/dev/null"
    stop gateway || true
    stop socat || true
    stop notify || true
    if grep -q '^READY=1' "$WORK/notify.log" && grep -q '^WATCHDOG=1' "$WORK/notify.log" && grep -q '^STOPPING=1' "$WORK/notify.log"; then
        record "strace run: the release binary sent READY=1, WATCHDOG=1 and STOPPING=1"
    else
        record "strace run: notifications" "got: $(sort -u "$WORK/notify.log" | tr '\n' '|')"
    fi
    grep -oE '^[0-9]+ +[a-z_0-9]+\(|<\.\.\. [a-z_0-9]+ resumed' "$WORK/trace" |
        sed -E 's/^[0-9]+ +//; s/\($//; s/^<\.\.\. //; s/ resumed$//' | sort -u >"$WORK/used.txt"
    allowed=$(for g in $(unit_words SystemCallFilter); do syscall_group "$g"; done | sort -u)
    denied=$(for g in $(sed -n 's/^SystemCallFilter=~//p' "$UNIT" | tr ' ' '\n'); do
        if [[ $g == @* ]]; then syscall_group "$g"; else echo "$g"; fi
    done | sort -u)
    outside=$(comm -23 "$WORK/used.txt" <(echo "$allowed") | tr '\n' ' ')
    refused=$(comm -12 "$WORK/used.txt" <(echo "$denied") | tr '\n' ' ')
    if [[ ! -s $WORK/used.txt ]]; then
        record "strace: system calls" "no system call seen in the trace"
    elif [[ -z $outside$refused ]]; then
        record "strace: all $(wc -l <"$WORK/used.txt") system calls the gateway made pass the unit's SystemCallFilter"
    else
        record "strace: system calls" "the unit's SystemCallFilter refuses:${outside:+ not allowed: $outside}${refused:+ denied: $refused}"
    fi
    families=$(grep -oE 'socket\(AF_[A-Z0-9]+' "$WORK/trace" | sed 's/socket(//' | sort -u | tr '\n' ' ')
    extra=$(comm -23 <(tr ' ' '\n' <<<"$families" | awk 'NF') <(unit_words RestrictAddressFamilies | sort -u) | tr '\n' ' ')
    if [[ -z $extra ]]; then
        record "strace: socket families used (${families% }) pass RestrictAddressFamilies"
    else
        record "strace: socket families" "RestrictAddressFamilies refuses $extra"
    fi
fi

# ---------------------------------------------------------------------------------------
# 4. Real installs.
if [[ $(id -u) -ne 0 || ${DEPLOY_INSTALL:-1} == 0 ]]; then
    echo "deploy: real installs skipped (need root, and DEPLOY_INSTALL unset or 1)"
    finish
fi
# One run at a time on a machine: two would install and purge under each other.
exec 9>/run/lock/twinbus-deploy-check.lock
flock -w 600 9 || die "lock" "another deployment check holds /run/lock/twinbus-deploy-check.lock"
if dpkg-query -W -f '${Status}' twinbus 2>/dev/null | grep -q 'installed' || [[ -e /etc/twinbus || -e /etc/systemd/system/twinbus.service ]]; then
    echo "deploy: twinbus is installed on this machine: real installs skipped, it is left alone"
    finish
fi
user_existed=0
getent passwd twinbus >/dev/null && user_existed=1
forget_user() {
    if ((user_existed == 0)) && getent passwd twinbus >/dev/null; then
        userdel twinbus >>"$WORK/install.log" 2>&1 || true
        if getent group twinbus >/dev/null; then
            groupdel twinbus >>"$WORK/install.log" 2>&1 || true
        fi
    fi
}

# service_user_checks HOW BINARY: the user, its groups, and what it can read.
service_user_checks() {
    local how=$1 bin=$2
    expect "$how: user twinbus exists, a system user without login" bash -c "getent passwd twinbus | grep -qE ':/usr/sbin/nologin$|:/sbin/nologin$'"
    if id -nG twinbus | tr ' ' '\n' | grep -qx dialout; then
        record "$how: twinbus is in dialout"
    else
        record "$how: twinbus is in dialout" "groups: $(id -nG twinbus)"
    fi
    expect_owner_mode "$how: /etc/twinbus is root:twinbus 0750" /etc/twinbus "root twinbus 750"
    expect_owner_mode "$how: /etc/twinbus/gateway.yaml is root:twinbus 0640" /etc/twinbus/gateway.yaml "root twinbus 640"
    expect "$how: twinbus check passes as the service user" runuser -u twinbus -- "$bin" check -c /etc/twinbus/gateway.yaml
    expect "$how: other users cannot read the config" bash -c "! runuser -u nobody -- cat /etc/twinbus/gateway.yaml"
}

# 4a. The Debian package.
echo "deploy: dpkg -i ${DEB##*/}"
if dpkg -i "$DEB" >>"$WORK/install.log" 2>&1; then
    record "deb install: dpkg -i"
    service_user_checks "deb install" /usr/bin/twinbus
    expect "deb install: the overrides are registered" bash -c "dpkg-statoverride --list /etc/twinbus/gateway.yaml | grep -q 'root twinbus 640'"
    if command -v systemd-analyze >/dev/null; then
        expect "deb install: systemd-analyze verify twinbus.service" systemd-analyze verify /usr/lib/systemd/system/twinbus.service
    fi
    expect "deb reinstall: dpkg -i again (the upgrade path)" dpkg -i "$DEB"
    expect_owner_mode "deb reinstall: the config is still root:twinbus 0640" /etc/twinbus/gateway.yaml "root twinbus 640"
    expect "deb purge: dpkg --purge twinbus" dpkg --purge twinbus
    expect "deb purge: /etc/twinbus and /usr/bin/twinbus are gone" bash -c "[[ ! -e /etc/twinbus && ! -e /usr/bin/twinbus ]]"
    expect "deb purge: no overrides are left" bash -c "! dpkg-statoverride --list | grep -q /etc/twinbus"
    expect "deb purge: the user twinbus stays" getent passwd twinbus
else
    record "deb install: dpkg -i" "failed (see install.log)"
    dpkg --purge twinbus >>"$WORK/install.log" 2>&1 || true
fi
forget_user

# 4b. By hand: deploy/install.sh, with the binary under a scratch prefix (that the service
# user can reach: WORK is private).
prefix=$(mktemp -d "${TMPDIR:-/tmp}/twinbus-prefix.XXXXXX")
chmod 0755 "$prefix"
echo "deploy: PREFIX=$prefix deploy/install.sh"
if PREFIX=$prefix "$ROOT/deploy/install.sh" "$TWINBUS" >>"$WORK/install.log" 2>&1; then
    record "install.sh: runs"
    service_user_checks "install.sh" "$prefix/bin/twinbus"
    expect "install.sh: the unit runs $prefix/bin/twinbus" grep -q "^ExecStart=$prefix/bin/twinbus run -c /etc/twinbus/gateway.yaml$" /etc/systemd/system/twinbus.service
    echo "# edited" >>/etc/twinbus/gateway.yaml
    expect "install.sh: runs again, keeping an edited config" bash -c "PREFIX='$prefix' '$ROOT/deploy/install.sh' '$TWINBUS' && tail -n 1 /etc/twinbus/gateway.yaml | grep -qx '# edited'"
else
    record "install.sh: runs" "failed (see install.log)"
fi
rm -rf /etc/twinbus /etc/systemd/system/twinbus.service "$prefix"
forget_user
finish
