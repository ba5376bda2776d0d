#!/usr/bin/env bash
# Install the walvault .deb in a clean Debian bookworm container and use it as a DBA would:
# dpkg -i, `man archive-agent`, the shell completion, the example configuration, then the daemon
# unit started by systemd (the container boots systemd as PID 1) against a PostgreSQL 15 cluster
# archiving through `archive-agent push`, the backup and verify units run by systemctl, and the
# backup listed by `restore-agent list`. Where systemd cannot boot in a container, the daemon
# runs under the container's init with the unit's own ExecStart line, and the script says so.
#
#   packaging/test-deb.sh [DEB]     (default: build it with packaging/build-deb.sh)
#
# Needs root, podman and mmdebstrap (apt-get install podman runc mmdebstrap; installed when
# missing). The base image walvault-deb-test:bookworm (bookworm + postgresql-15, man-db, systemd,
# built by mmdebstrap, no registry) is kept between runs. Exit 0: everything checked; 77: podman
# cannot run containers here (skipped); anything else: a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
podman=${PODMAN:-podman}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
image=walvault-deb-test:bookworm
say() { echo "test-deb: $*" >&2; }

for tool in podman mmdebstrap; do
    command -v "$tool" >/dev/null || { say "installing $tool"; apt-get install -y -q podman runc mmdebstrap >/dev/null; }
done
if ! "$podman" info >/dev/null 2>&1; then
    say "podman cannot run containers on this machine: skipped"
    exit 77
fi

deb=${1:-}
if [ -z "$deb" ]; then
    deb=$(packaging/build-deb.sh target/debian | tail -1)
fi
deb=$(readlink -f "$deb")

work=$(mktemp -d /var/tmp/walvault-deb-test.XXXXXX)
name=walvault-deb-test-$$
cleanup() {
    "$podman" rm -f -t 2 "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

packages=postgresql-15,man-db,systemd,systemd-sysv,dbus,ca-certificates,procps
inputs=$(echo "bookworm apt $packages $mirror" | sha256sum | cut -c1-16)
if [ "$("$podman" image inspect --format '{{index .Labels "walvault.inputs"}}' "$image" 2>/dev/null)" != "$inputs" ]; then
    say "building $image with mmdebstrap (once)"
    SOURCE_DATE_EPOCH=1735689600 mmdebstrap --quiet --variant=apt --include="$packages" \
        --aptopt='APT::Install-Recommends "false"' \
        --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.d/walvault.conf"' \
        bookworm "$work/base.tar" "deb $mirror bookworm main"
    "$podman" import --quiet --change "LABEL walvault.inputs=$inputs" --change 'CMD ["/sbin/init"]' \
        "$work/base.tar" "$image" >/dev/null
    rm -f "$work/base.tar"
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cp "$deb" "$work/walvault.deb"
"$podman" run -d --name "$name" --network host --systemd=always --pull=never \
    -v "$work:/pkg:ro" "$image" /sbin/init >/dev/null
inside() { "$podman" exec "$name" bash -euo pipefail -c "$1"; }

booted=no
state=unknown
for _ in $(seq 1 60); do
    state=$("$podman" exec "$name" systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) booted=yes; break ;; esac
    sleep 0.5
done
if [ $booted = no ]; then
    # The container's own init instead (podman's catatonit), kept alive by a sleep.
    "$podman" rm -f -t 2 "$name" >/dev/null
    "$podman" run -d --name "$name" --network host --init --pull=never \
        -v "$work:/pkg:ro" "$image" sleep infinity >/dev/null
fi

say "dpkg -i $(basename "$deb")"
inside 'dpkg -i /pkg/walvault.deb >/dev/null'
inside 'archive-agent --version && restore-agent --version' >&2
inside 'man archive-agent | grep -q "archive-agent"' && say "man archive-agent: shown"
inside 'man restore-agent-restore | grep -q -- "--target-time"' && say "man restore-agent-restore: names --target-time"
inside 'test -s /usr/share/bash-completion/completions/archive-agent && grep -q "copy" /usr/share/bash-completion/completions/archive-agent'
say "bash completion: archive-agent's subcommands"
inside 'test "$(stat -c %G /etc/walvault/walvault.toml)" = postgres && test "$(stat -c %a /etc/walvault/walvault.toml)" = 640'
say "/etc/walvault/walvault.toml: group postgres, mode 0640"

# A cluster archiving through the package's archive-agent, into a repository under /var/lib/walvault.
inside "install -d -o postgres -g postgres /var/lib/walvault /var/run/postgresql
    runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/15/main >/dev/null
    cat >> /var/lib/postgresql/15/main/postgresql.conf <<CONF
port = $pgport
listen_addresses = ''
unix_socket_directories = '/var/run/postgresql'
archive_mode = on
archive_command = 'archive-agent push %p'
CONF
    sed -i 's|^PGHOST=.*|PGHOST=/var/run/postgresql\nPGPORT=$pgport|; s|^WALVAULT_METRICS_ADDR=.*|WALVAULT_METRICS_ADDR=127.0.0.1:$port|' /etc/default/walvault
    runuser -u postgres -- archive-agent init --pgdata /var/lib/postgresql/15/main >/dev/null
    runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main -l /var/lib/postgresql/pg.log -w start >/dev/null"

if [ $booted = yes ]; then
    say "systemd is PID 1: systemctl start walvault-daemon"
    inside 'systemctl daemon-reload && systemctl start walvault-daemon'
else
    say "systemd did not boot in the container ($state): running the unit's ExecStart under the container's init"
    inside 'set -a; . /etc/default/walvault; set +a
        line=$(sed -n "s/^ExecStart=//p" /lib/systemd/system/walvault-daemon.service)
        eval "set -- $line"
        setsid runuser -u postgres -- "$@" > /var/lib/postgresql/daemon.log 2>&1 < /dev/null &'
fi
for _ in $(seq 1 60); do
    curl_out=$(python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:$port/health',timeout=1).read().decode())" 2>/dev/null || true)
    [ -n "$curl_out" ] && break
    sleep 0.5
done
[ -n "$curl_out" ] || { inside 'journalctl -u walvault-daemon --no-pager -n 50 || cat /var/lib/postgresql/daemon.log' >&2 || true; say "the daemon never answered /health"; exit 1; }
say "daemon answers /health on 127.0.0.1:$port"

inside "runuser -u postgres -- psql -h /var/run/postgresql -p $pgport -qAtc 'CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g; SELECT pg_switch_wal();' >/dev/null"
if [ $booted = yes ]; then
    inside 'systemctl start walvault-backup.service && systemctl start walvault-verify.service'
    say "walvault-backup.service and walvault-verify.service ran (Type=oneshot, sandboxed)"
    inside 'systemctl enable --now walvault-backup.timer walvault-expire.timer walvault-verify.timer walvault-drill.timer 2>/dev/null'
    inside 'systemctl list-timers --no-pager | grep -c "walvault-.*\.timer"' | grep -qx 4
    say "4 walvault timers enabled and scheduled (systemctl list-timers)"
else
    inside 'set -a; . /etc/default/walvault; set +a; runuser -u postgres -- archive-agent backup --pgdata "$PGDATA" >/dev/null && runuser -u postgres -- restore-agent verify >/dev/null'
fi
inside 'runuser -u postgres -- restore-agent list' | tee "$work/list.txt" >&2
grep -qE '^[0-9]{8}T[0-9]{6}Z ' "$work/list.txt" || { say "restore-agent list shows no backup"; exit 1; }
archived=$(python3 -c "import urllib.request;print([l for l in urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode().splitlines() if l.startswith('walvault_up ')][0])")
say "metrics: $archived"
inside 'dpkg -r walvault >/dev/null && ! command -v archive-agent && test -f /etc/walvault/walvault.toml'
say "dpkg -r: binaries gone, configuration kept (conffile)"
say "passed (systemd booted: $booted)"
