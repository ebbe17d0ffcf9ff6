#!/usr/bin/env bash
# Prepares a Debian machine without a Docker engine to run the compose stack through podman.
#
# Idempotent; run as root. What it does, each step only when it is not done yet:
#   1. installs podman, runc and debootstrap from the machine's Debian archive;
#   2. writes /etc/containers/containers.conf: runc as the runtime (crun refuses hybrid cgroups)
#      and no default ulimits (podman's default open-files limit can exceed the machine's hard limit);
#   3. makes the local base image $INCSEG_BASE_IMAGE with debootstrap from the machine's Debian mirror
#      (no container registry is reachable here);
#   4. builds $INCSEG_REDIS_IMAGE (deploy/podman/Dockerfile.redis) from that base;
#   5. starts podman's Docker-compatible API on $INCSEG_PODMAN_SOCKET for the compose binary.
# Then: export DOCKER_HOST=unix://$INCSEG_PODMAN_SOCKET
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base_image="${INCSEG_BASE_IMAGE:-localhost/incseg-base:bookworm}"
redis_image="${INCSEG_REDIS_IMAGE:-localhost/incseg-redis:bookworm}"
socket="${INCSEG_PODMAN_SOCKET:-/tmp/incseg-podman/podman.sock}"
suite="bookworm"

log() { printf '[setup %s] %s\n' "$(date +%T)" "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "deploy/podman/setup.sh: run as root (it installs packages and runs rootful podman)" >&2
    exit 1
fi

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap
fi

if [ ! -e /etc/containers/containers.conf ]; then
    log "writing /etc/containers/containers.conf (runc, no default ulimits)"
    mkdir -p /etc/containers
    cat > /etc/containers/containers.conf << 'EOF'
# Written by incseg deploy/podman/setup.sh.
[containers]
# podman's default open-files limit is above the hard limit of some machines: keep the caller's limits.
default_ulimits = []

[engine]
# crun refuses hybrid cgroup hierarchies; runc runs on them.
runtime = "runc"
EOF
fi

# The machine's Debian mirror: the first URIs line of deb822 sources, else the first deb line.
debian_mirror() {
    local uri
    uri="$(grep -h -m1 '^URIs:' /etc/apt/sources.list.d/*.sources 2> /dev/null | awk '{print $2}' || true)"
    if [ -z "$uri" ]; then
        uri="$(grep -h -m1 '^deb ' /etc/apt/sources.list 2> /dev/null | awk '{print $2}' || true)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# What the official debian:bookworm-slim image does to its root file system: the same apt sources as this
# machine (with updates and security), no package cache or lists in the image, and apt set to drop
# downloaded packages after installing them, so that the images built on it have their usual sizes.
slim_rootfs() {
    local rootfs="$1"
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/debian.sources"
        rm -f "$rootfs/etc/apt/sources.list"
    fi
    cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" << 'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
}

if ! podman image exists "$base_image"; then
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d /var/tmp/incseg-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap --variant=minbase $suite from $mirror"
    started=$SECONDS
    debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    slim_rootfs "$rootfs"
    tar -C "$rootfs" -c . | podman import --quiet - "$base_image" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "base image $base_image in $((SECONDS - started)) s"
fi

if ! podman image exists "$redis_image"; then
    log "building $redis_image"
    started=$SECONDS
    podman build --quiet --network host --build-arg "BASE_IMAGE=$base_image" \
        -f "$here/Dockerfile.redis" -t "$redis_image" "$here" > /dev/null
    log "redis image $redis_image in $((SECONDS - started)) s"
fi

ping_socket() { curl -fsS --max-time 5 --unix-socket "$socket" http://podman/_ping > /dev/null 2>&1; }
if ! ping_socket; then
    log "starting podman system service on $socket"
    mkdir -p "$(dirname "$socket")"
    rm -f "$socket"
    nohup podman system service --time=0 "unix://$socket" > "$(dirname "$socket")/service.log" 2>&1 &
    echo $! > "$(dirname "$socket")/service.pid"
    for _ in $(seq 50); do
        ping_socket && break
        sleep 0.2
    done
    ping_socket || { echo "podman system service did not answer on $socket" >&2; exit 1; }
fi
log "ready: export DOCKER_HOST=unix://$socket"
