#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, for machines that cannot pull from a registry:
# Debian bookworm (debootstrap minbase) + Debian's Python 3.11 with venv and pip, with
# `python` and `pip` on PATH as in the official image. Imported into podman under the name
# the Dockerfiles' FROM line uses, so they build unchanged.
#   docker/test/standin-base.sh [TAG]     (default docker.io/library/python:3.11-slim-bookworm)
# Needs root, debootstrap and podman. Skips the work when the tag exists already.
set -euo pipefail

TAG=${1:-docker.io/library/python:3.11-slim-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$TAG"; then
    echo "stand-in base: $TAG exists"
    exit 0
fi
root=$(mktemp -d /var/tmp/aftertrip-standin.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$SECONDS
nice -n 10 debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# The official image's Python is /usr/local/bin/python with pip beside it; Debian's is
# python3 (3.11.2 on bookworm) and its pip is python3 -m pip, so both get the usual names.
chroot "$root" /bin/sh -c '
    set -e
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip ca-certificates >/dev/null
    ln -sf /usr/bin/python3 /usr/local/bin/python
    printf "#!/bin/sh\nexec python3 -m pip \"\$@\"\n" >/usr/local/bin/pip
    chmod 755 /usr/local/bin/pip
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
'
tar -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "stand-in base: $TAG built in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)"
