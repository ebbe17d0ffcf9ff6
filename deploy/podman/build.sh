#!/usr/bin/env bash
# Builds the CPU images of the stack (deploy/Dockerfile.api, deploy/Dockerfile.worker) with podman on this
# machine, from the local base image of deploy/podman/setup.sh (run that first).
#
# The Dockerfiles stay as users build them; what this machine needs is given from outside:
#   - the Docker image format (podman's default, OCI, drops the Dockerfiles' HEALTHCHECK);
#   - the host network (the package index is reached through the machine's TLS proxy) and the machine's
#     CA bundle, mounted beside (not over) the image's own: the images install Debian's ca-certificates,
#     whose set-up replaces /etc/ssl/certs/ca-certificates.crt and fails on a mount there;
#   - a pip configuration made from the machine's (`pip config list`: cert, constraint, find-links,
#     index-url, extra-index-url), mounted at /etc/pip.conf, with every local file and directory it names
#     mounted read-only at the same path, so that torch and the other large wheels come from this disk;
#   - the worker's torch index argument emptied: the CPU wheel index of PyTorch is not reachable here,
#     so the worker gets torch==2.14.1 from the machine's wheels (the CUDA build, see BENCHMARKS.md).
# Usage: deploy/podman/build.sh [api] [worker]     (both when none is named)
# Prints one line per image: name, build seconds, size in bytes.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
base_image="${INCSEG_BASE_IMAGE:-localhost/incseg-base:bookworm}"
api_image="${INCSEG_API_IMAGE:-incseg-api:cpu}"
worker_image="${INCSEG_WORKER_IMAGE:-incseg-worker:cpu}"
host_python="${INCSEG_HOST_PYTHON:-python3}"
ca_bundle="/etc/ssl/certs/ca-certificates.crt"
build_ca_bundle="/run/incseg-build/ca-certificates.crt"

log() { printf '[build %s] %s\n' "$(date +%T)" "$*" >&2; }

workdir="$(mktemp -d /tmp/incseg-podman-build.XXXXXX)"
trap 'rm -rf "$workdir"' EXIT

# The machine's pip settings that decide where packages come from (later lines win: pip lists the files
# first and the PIP_* variables last).
pip_setting() {
    "$host_python" -m pip config list 2> /dev/null \
        | sed -n -E "s/^(global|install|:env:)\.$1='(.*)'$/\2/p" | tail -n 1
}

mounts=(-v "$ca_bundle:$build_ca_bundle:ro")
mounted=()
mount_path() {
    local path="$1" known
    [ -e "$path" ] || return 0
    for known in "${mounted[@]}"; do
        [ "$known" = "$path" ] && return 0
    done
    mounted+=("$path")
    mounts+=(-v "$path:$path:ro")
}

{
    echo "[global]"
    echo "cert = $build_ca_bundle"
    for key in constraint find-links index-url extra-index-url; do
        value="$(pip_setting "$key")"
        [ -n "$value" ] && echo "$key = $value"
        for item in $value; do
            case "$item" in
                file://*)
                    # A local simple index links to ../../files: mount the folder that holds `simple`.
                    dir="${item#file://}"
                    dir="${dir%/}"
                    [ "$(basename "$dir")" = "simple" ] && dir="$(dirname "$dir")"
                    mount_path "$dir"
                    ;;
                /*) mount_path "$item" ;;
            esac
        done
    done
} > "$workdir/pip.conf"
mounts+=(-v "$workdir/pip.conf:/etc/pip.conf:ro")
log "pip configuration of the builds: $(grep -v '^\[' "$workdir/pip.conf" | tr '\n' ';')"

build() {
    local name="$1" image="$2" dockerfile="$3"
    shift 3
    local started=$SECONDS previous
    previous="$(podman image inspect --format '{{.Id}}' "$image" 2> /dev/null || true)"
    log "building $image from $dockerfile (base $base_image)"
    podman build --format docker --network host "${mounts[@]}" \
        --build-arg "BASE_IMAGE=$base_image" --build-arg PYTHON=python3 "$@" \
        -f "$repo/$dockerfile" -t "$image" "$repo" > "$workdir/$name.log" 2>&1 \
        || { tail -n 60 "$workdir/$name.log" >&2; log "building $image failed"; exit 1; }
    echo "$image $((SECONDS - started)) $(podman image inspect --format '{{.Size}}' "$image")"
    # The image this tag named before (several GB for the worker) and its cache layers that no other
    # image uses; one still used by a container stays.
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
        podman rmi "$previous" > /dev/null 2>&1 || log "kept the previous $image ($previous): in use"
    fi
}

targets=("$@")
[ "${#targets[@]}" -eq 0 ] && targets=(api worker)
for target in "${targets[@]}"; do
    case "$target" in
        api) build api "$api_image" deploy/Dockerfile.api --build-arg EXTRAS=api ;;
        worker)
            build worker "$worker_image" deploy/Dockerfile.worker --build-arg EXTRAS=service \
                --build-arg PIP_EXTRA_INDEX_URL=
            ;;
        *)
            echo "deploy/podman/build.sh: unknown image '$target' (api or worker)" >&2
            exit 2
            ;;
    esac
done
