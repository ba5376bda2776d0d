#!/usr/bin/env bash
# Build walvault's container images from Debian's packages, without any registry:
#   walvault:bookworm         Debian bookworm + postgresql-15 + archive-agent, restore-agent
#                             (one image for the database and for the sidecar daemon)
#   walvault-garage:bookworm  Debian bookworm + garage 2.5.0 (an S3 server for the examples)
# Each is a base root file system made by mmdebstrap from the bookworm suites (pinned by name,
# SOURCE_DATE_EPOCH fixed, exactly the packages listed below, no recommends) and imported with
# `podman import`, plus a small layer with the binaries and the entry point (`podman build
# --pull=never`). Idempotent: an image is rebuilt only when its inputs changed (a hash of the package
# list, the binaries and the entry point is kept in a label), or with --rebuild.
#
# Environment:
#   BIN_DIR        a directory holding archive-agent and restore-agent (default: build them with
#                  `cargo build --release --workspace --bins --locked` and take target/release)
#   GARAGE_BIN     the garage binary (default: $CARGO_HOME/bin/garage, installed with
#                  `cargo install --locked garage@2.5.0` when missing)
#   DEBIAN_MIRROR  default http://deb.debian.org/debian (and its -security sibling)
#   PODMAN         default podman
# Needs root (mmdebstrap's root mode, podman as root): apt-get install podman runc mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
rebuild=0
for arg in "$@"; do
  case $arg in
    --rebuild) rebuild=1 ;;
    *) echo "usage: $0 [--rebuild]" >&2; exit 2 ;;
  esac
done
podman=${PODMAN:-podman}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600} # 2025-01-01: fixed timestamps in the tarball
pg_packages=postgresql-15,ca-certificates
garage_packages=ca-certificates
garage_version=2.5.0

bin_dir=${BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  cargo build --release --workspace --bins --locked
  bin_dir=target/release
fi
garage_bin=${GARAGE_BIN:-${CARGO_HOME:-$HOME/.cargo}/bin/garage}
if ! "$garage_bin" --version 2>/dev/null | grep -q "$garage_version"; then
  echo "build-images: installing garage $garage_version from crates.io (about 15 minutes, once)" >&2
  cargo install --locked "garage@$garage_version"
  garage_bin=${CARGO_HOME:-$HOME/.cargo}/bin/garage
fi

work=$(mktemp -d /var/tmp/walvault-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

id_of() { "$podman" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
# drop_old ID IMAGE: the image IMAGE named before this build, now nameless, goes.
drop_old() { if [ -n "$1" ] && [ "$1" != "$(id_of "$2")" ]; then "$podman" rmi "$1" >/dev/null 2>&1 || true; fi; }
label_of() { "$podman" image inspect --format '{{index .Labels "walvault.inputs"}}' "$1" 2>/dev/null || true; }
# fresh IMAGE HASH: true when IMAGE exists and was built from inputs hashing to HASH.
fresh() { [ $rebuild = 0 ] && [ "$(label_of "$1")" = "$2" ]; }

# base IMAGE VARIANT PACKAGES: a root file system from Debian's packages, imported as IMAGE.
base() {
  local image=$1 variant=$2 packages=$3 hash old
  hash=$(echo "$suite $variant $packages $mirror $SOURCE_DATE_EPOCH" | sha256sum | cut -c1-16)
  if fresh "$image" "$hash"; then
    echo "build-images: $image is up to date" >&2
    return
  fi
  old=$(id_of "$image")
  echo "build-images: mmdebstrap --variant=$variant --include=$packages $suite -> $image" >&2
  # No documentation or translations; no "main" cluster (the entry point creates one in $PGDATA).
  mmdebstrap --quiet --variant="$variant" --include="$packages" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.d/walvault.conf"' \
    "$suite" "$work/base.tar" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb ${mirror%/debian}/debian-security $suite-security main"
  "$podman" import --quiet --change "LABEL walvault.inputs=$hash" --change 'CMD ["/bin/bash"]' \
    "$work/base.tar" "$image" >/dev/null
  rm -f "$work/base.tar"
  drop_old "$old" "$image"
}

# layer IMAGE BASE CONTEXT: the Containerfile in CONTEXT on top of BASE, imported as IMAGE.
layer() {
  local image=$1 base_image=$2 context=$3 hash old
  hash=$( (label_of "$base_image"; cd "$context" && sha256sum ./*) | sha256sum | cut -c1-16)
  if fresh "$image" "$hash"; then
    echo "build-images: $image is up to date" >&2
    return
  fi
  old=$(id_of "$image")
  echo "build-images: $image (on $base_image)" >&2
  "$podman" build --quiet --pull=never --label "walvault.inputs=$hash" -t "$image" "$context" >/dev/null
  drop_old "$old" "$image"
}

base walvault-base:$suite apt "$pg_packages"
base walvault-garage-base:$suite essential "$garage_packages"

ctx=$work/walvault
mkdir -p "$ctx"
install -m 0755 "$bin_dir/archive-agent" "$bin_dir/restore-agent" "$ctx/"
install -m 0755 docker/walvault-entrypoint.sh "$ctx/walvault-entrypoint"
cat > "$ctx/Containerfile" <<CONTAINERFILE
FROM localhost/walvault-base:$suite
COPY archive-agent restore-agent walvault-entrypoint /usr/local/bin/
# No PGDATA here: \`archive-agent backup\` without it (and without --pgdata) backs up over the
# replication protocol. The entry point defaults it to /var/lib/postgresql/data/pgdata.
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
ENTRYPOINT ["/usr/local/bin/walvault-entrypoint"]
CMD ["postgres"]
STOPSIGNAL SIGINT
CONTAINERFILE
layer walvault:$suite walvault-base:$suite "$ctx"

ctx=$work/garage
mkdir -p "$ctx"
install -m 0755 "$garage_bin" "$ctx/garage"
install -m 0755 docker/garage-entrypoint.sh "$ctx/garage-entrypoint"
cat > "$ctx/Containerfile" <<CONTAINERFILE
FROM localhost/walvault-garage-base:$suite
COPY garage garage-entrypoint /usr/local/bin/
VOLUME /var/lib/garage
ENTRYPOINT ["/usr/local/bin/garage-entrypoint"]
CONTAINERFILE
layer walvault-garage:$suite walvault-garage-base:$suite "$ctx"
"$podman" image ls --filter reference='walvault*' >&2
