#!/usr/bin/env bash
# Build the walvault Debian package: both agents, their man pages and shell completions
# (generated from the same clap definitions by walvault-gen-docs), an example
# /etc/walvault/walvault.toml, /etc/default/walvault, and the systemd units (the daemon, and
# timers for backup, expire, verify and drill).
#
#   packaging/build-deb.sh [OUT_DIR]        -> OUT_DIR/walvault_<version>-1_<arch>.deb (default target/debian)
#
# Needs cargo, dpkg-deb (dpkg) and dpkg-shlibdeps (dpkg-dev, for the Depends line; libc6 and
# libgcc-s1 are assumed without it). BIN_DIR=dir skips the build and packages the agents found there
# (and uses the walvault-gen-docs beside them, if any).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
if [ -z "${BIN_DIR:-}" ]; then
    cargo build --release --locked -p archive-agent -p restore-agent -p walvault-packaging
    BIN_DIR=target/release
    gen=target/release/walvault-gen-docs
elif [ -x "$BIN_DIR/walvault-gen-docs" ]; then
    gen=$BIN_DIR/walvault-gen-docs  # built beside the agents (cargo build --workspace --bins)
else
    cargo build --locked -p walvault-packaging
    gen=target/debug/walvault-gen-docs
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
docs=$work/docs
"$gen" "$docs"

install -D -m 0755 "$BIN_DIR/archive-agent" "$root/usr/bin/archive-agent"
install -D -m 0755 "$BIN_DIR/restore-agent" "$root/usr/bin/restore-agent"
strip --strip-debug "$root/usr/bin/archive-agent" "$root/usr/bin/restore-agent" 2>/dev/null || true
mkdir -p "$root/usr/share/man/man1"
for page in "$docs"/man/*.1; do
    gzip -9n -c "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"
done
for agent in archive-agent restore-agent; do
    install -D -m 0644 "$docs/completions/bash/$agent.bash" "$root/usr/share/bash-completion/completions/$agent"
    install -D -m 0644 "$docs/completions/zsh/_$agent" "$root/usr/share/zsh/vendor-completions/_$agent"
    install -D -m 0644 "$docs/completions/fish/$agent.fish" "$root/usr/share/fish/vendor_completions.d/$agent.fish"
done
install -D -m 0640 packaging/etc/walvault.toml "$root/etc/walvault/walvault.toml"
install -D -m 0644 packaging/etc/default-walvault "$root/etc/default/walvault"
for unit in packaging/systemd/*; do
    install -D -m 0644 "$unit" "$root/lib/systemd/system/$(basename "$unit")"
done
install -D -m 0644 README.md "$root/usr/share/doc/walvault/README.md"
gzip -9n "$root/usr/share/doc/walvault/README.md"
cat > "$root/usr/share/doc/walvault/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: walvault

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

depends="libc6 (>= 2.34), libgcc-s1 (>= 4.2)"
if command -v dpkg-shlibdeps >/dev/null; then
    mkdir -p "$work/shlib/debian"
    echo "Source: walvault" > "$work/shlib/debian/control"
    depends=$(cd "$work/shlib" && dpkg-shlibdeps -O "$root/usr/bin/archive-agent" "$root/usr/bin/restore-agent" 2>/dev/null \
        | sed -n 's/^shlibs:Depends=//p')
fi
mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: walvault
Version: $version-1
Architecture: $arch
Maintainer: walvault developers <walvault@example.invalid>
Installed-Size: $(du -sk "$root" | cut -f1)
Depends: $depends
Recommends: postgresql-15 | postgresql
Suggests: prometheus
Section: database
Priority: optional
Description: PostgreSQL WAL archiver and point-in-time recovery agent
 archive-agent is PostgreSQL's archive_command (push), a sidecar daemon that
 uploads WAL ahead of the archiver or streams it over the replication
 protocol, base backups into content-addressed packs, retention and a second
 copy of the repository. restore-agent is its restore_command (fetch), and
 restores to any instant, verifies, finds destructive transactions, extracts
 one table and runs restore drills. Repositories on local disk, S3, Azure or
 GCS, optionally encrypted.
CONTROL
printf '/etc/walvault/walvault.toml\n/etc/default/walvault\n' > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The configuration may hold credentials: readable by PostgreSQL's user, not by everyone.
    if getent group postgres >/dev/null; then
        chgrp postgres /etc/walvault/walvault.toml || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/walvault_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
