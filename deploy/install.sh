#!/bin/sh
# Installs twinbus as a systemd service by hand, as the Debian package does, for a gateway where
# the .deb does not fit. As root, from the repository, after `cargo build --release`:
#   sudo deploy/install.sh [BINARY]          (BINARY: default target/release/twinbus)
# It installs
#   BINARY                  as /usr/local/bin/twinbus (PREFIX=/usr/local)
#   deploy/twinbus.service  as /etc/systemd/system/twinbus.service, ExecStart pointing there
#   the system user and group `twinbus`, in the serial ports' group (SERIAL_GROUP=dialout;
#                           uucp on Arch)
#   /etc/twinbus            root:twinbus 0750
#   gateway.yaml (the demo) as /etc/twinbus/gateway.yaml, root:twinbus 0640, unless one is there
# and starts nothing. Then: edit the config, check it, `systemctl enable --now twinbus`.
# Uninstall: systemctl disable --now twinbus; rm /usr/local/bin/twinbus
#   /etc/systemd/system/twinbus.service; systemctl daemon-reload; and, to forget everything,
#   rm -r /etc/twinbus /var/lib/twinbus; userdel twinbus.
set -eu

cd "$(dirname "$0")/.."
binary=${1:-target/release/twinbus}
prefix=${PREFIX:-/usr/local}
serial_group=${SERIAL_GROUP:-dialout}

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run it as root (sudo $0)" >&2
    exit 1
fi
if [ ! -x "$binary" ]; then
    echo "install.sh: no executable $binary: build it first (cargo build --release)" >&2
    exit 1
fi

install -D -m 0755 "$binary" "$prefix/bin/twinbus"

unit=/etc/systemd/system/twinbus.service
sed "s|^ExecStart=/usr/bin/twinbus |ExecStart=$prefix/bin/twinbus |" deploy/twinbus.service >"$unit.tmp"
grep -q "^ExecStart=$prefix/bin/twinbus run " "$unit.tmp" || {
    echo "install.sh: could not point ExecStart at $prefix/bin/twinbus" >&2
    rm -f "$unit.tmp"
    exit 1
}
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"

if ! getent passwd twinbus >/dev/null; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir /var/lib/twinbus --no-create-home \
        --shell "$nologin" --comment "twinbus gateway" twinbus
fi
if getent group "$serial_group" >/dev/null; then
    usermod --append --groups "$serial_group" twinbus
else
    echo "install.sh: warning: no group $serial_group; give twinbus access to the serial ports (SERIAL_GROUP=...)" >&2
fi

install -d -m 0750 -o root -g twinbus /etc/twinbus
if [ ! -e /etc/twinbus/gateway.yaml ]; then
    install -m 0640 -o root -g twinbus gateway.yaml /etc/twinbus/gateway.yaml
else
    echo "install.sh: kept the existing /etc/twinbus/gateway.yaml"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "install.sh: installed; next:"
echo "  edit /etc/twinbus/gateway.yaml, then"
echo "  sudo -u twinbus $prefix/bin/twinbus check -c /etc/twinbus/gateway.yaml"
echo "  sudo systemctl enable --now twinbus"
