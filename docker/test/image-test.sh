#!/usr/bin/env bash
# `make image-test`: build the images from docker/ with podman and run them (docs/deploy.md).
#   docker/test/image-test.sh [PYTHON]    PYTHON: the project's virtualenv (`make install`)
# Installs what it needs (Debian: podman, runc, debootstrap, redis-server; PyPI:
# podman-compose into .cache/), builds the base from Debian packages when no registry can be
# reached, builds the CPU and GPU images and the compose stand-ins, then runs docker/test/.
# Needs root (podman as root, debootstrap). Environment:
#   IMAGE_TEST_GPU=0    skip the GPU image (3.5 GB)
#   IMAGE_TEST_KEEP=1   keep the GPU image and the stand-ins afterwards (the CPU image and the
#                       base are always kept: the next run reuses their layers)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
PYTHON=${1:-.venv/bin/python}
BASE=docker.io/library/python:3.11-slim-bookworm
PODMAN_COMPOSE_VERSION=1.6.0
work=$root/.cache/image-test
mkdir -p "$work"
say() { printf '\n== %s\n' "$*"; }
started=$SECONDS
summary=()

if [[ $(id -u) != 0 ]]; then
    echo "image-test needs root (podman as root, debootstrap): sudo make image-test" >&2
    exit 2
fi
missing=()
for tool in podman runc debootstrap redis-server; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt)"
    t=$SECONDS
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$work/apt.log"
    summary+=("apt ${missing[*]}: $((SECONDS - t)) s")
fi
# runc instead of crun, no default ulimits: this file, not /etc, configures podman here.
export CONTAINERS_CONF=$root/docker/test/containers.conf

if ! podman image exists "$BASE"; then
    if podman pull -q "$BASE" >/dev/null 2>&1; then
        say "pulled $BASE"
    else
        say "no registry: $BASE stood in for by Debian bookworm + its Python 3.11"
        t=$SECONDS
        docker/test/standin-base.sh "$BASE"
        summary+=("stand-in base: built in $((SECONDS - t)) s")
    fi
fi

# pip inside the builds: the host's network, and its CA bundle when pip is configured with
# one (a TLS-intercepting proxy), lent to the build only: nothing host-specific is baked in.
build=(podman build --format docker --network host)
cert=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
if [[ -n $cert && -f $cert ]]; then
    build+=(-v "$cert:/etc/ssl/certs/ca-certificates.crt:ro")
fi
if [[ ${PIP_INDEX_URL:-} == http* ]]; then
    printf '[global]\nindex-url = %s\n' "$PIP_INDEX_URL" >"$work/pip.conf"
    build+=(-v "$work/pip.conf:/etc/pip.conf:ro")
fi
timed_build() {  # NAME BUILD-ARGS...: build, log to .cache/image-test/, note the time
    local name=$1 t=$SECONDS
    shift
    if ! nice -n 10 "${build[@]}" "$@" >"$work/build-$name.log" 2>&1; then
        tail -40 "$work/build-$name.log"
        echo "building $name failed: $work/build-$name.log" >&2
        exit 1
    fi
    summary+=("$name: built in $((SECONDS - t)) s")
    say "${summary[-1]}"
}

timed_build cpu -f docker/Dockerfile.cpu --ignorefile docker/Dockerfile.cpu.dockerignore \
    -t aftertrip-faces:cpu .
if [[ ${IMAGE_TEST_GPU:-1} != 0 ]]; then
    df -h "$root" | tail -1
    timed_build gpu -f docker/Dockerfile.gpu --ignorefile docker/Dockerfile.gpu.dockerignore \
        -t aftertrip-faces:gpu .
fi
for standin in redis postgres s3; do
    timed_build "standin-$standin" -f "docker/test/standins/$standin.Containerfile" \
        -t "localhost/aftertrip-standin-$standin:test" docker/test/standins
done

compose_venv=$root/.cache/podman-compose
if [[ ! -x $compose_venv/bin/podman-compose ]]; then
    say "podman-compose $PODMAN_COMPOSE_VERSION (PyPI) into $compose_venv"
    t=$SECONDS
    "$PYTHON" -m venv "$compose_venv"
    "$compose_venv/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
    summary+=("podman-compose: installed in $((SECONDS - t)) s")
fi

cleanup() {
    if [[ ${IMAGE_TEST_KEEP:-0} != 1 ]]; then
        podman rmi --ignore aftertrip-faces:gpu localhost/aftertrip-standin-{redis,postgres,s3}:test >/dev/null
    fi
    podman image prune -f >/dev/null  # the layers earlier builds left untagged
}
trap cleanup EXIT

say "images"
podman images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E 'aftertrip|python'
say "docker/test (pytest)"
status=0
t=$SECONDS
PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} \
    AFTERTRIP_PODMAN_COMPOSE=$compose_venv/bin/podman-compose \
    "$PYTHON" -m pytest -p no:cacheprovider -p tests.plugins.s3 -o log_cli=true \
    --log-cli-level=INFO -rs docker/test || status=$?
summary+=("pytest docker/test: $((SECONDS - t)) s")
say "summary"
printf '%s\n' "${summary[@]}"
echo "image-test: $((SECONDS - started)) s, pytest exit status $status"
exit $status
