#!/usr/bin/env bash
# Installs what hvmdm's tests need on a fresh Debian bookworm machine (root). Idempotent.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-system-data qemu-utils seabios ovmf busybox-static cpio acpica-tools zstd xz-utils kmod
      libxen-dev xen-utils-4.17 xenstore-utils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2 || true
done
