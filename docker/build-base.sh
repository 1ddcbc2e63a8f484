#!/usr/bin/env bash
# Build a local base image for the Dockerfile where no registry can be reached:
# a minimal Debian bookworm with Python 3.11 (debootstrap + docker import).
# Usage: docker/build-base.sh [TAG]   (default replicad-base:bookworm); needs root.
set -euo pipefail
tag="${1:-replicad-base:bookworm}"
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag is already there"
    exit 0
fi
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
root="$(mktemp -d /var/tmp/replicad-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
echo "debootstrap bookworm from $mirror into $root (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "built $tag"
