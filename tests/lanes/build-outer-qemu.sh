#!/bin/bash
# build-outer-qemu.sh: build a patched qemu-system-x86_64 for the lane-K OUTER (TCG) VM.
#
# Why: Debian's QEMU 7.2 aborts under TCG with
#   tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked())
# when an L2 guest (OVMF under L1 KVM with an in-kernel LAPIC) writes CR8 with the
# CR8-write intercept off: helper_write_crN() raises CPU_INTERRUPT_VIRQ without the BQL.
# tests/lanes/patches/*.patch takes the BQL there (see test-lanes.md, "Known traps").
#
# What: Debian's own source package of the installed qemu-system-x86 version
# (apt-get source), our patches on top, a minimal x86_64-softmmu build (TCG, pc
# machine, no tools/docs/UI/network), and only the binary is kept:
#   ${LANEK_CACHE:-tests/lanes/cache}/outer-qemu/<key>/bin/qemu-system-x86_64
# The key hashes the source version, the patches and the build settings; when that
# binary exists, nothing else is done. At run time the binary uses Debian's firmware
# (qemu-system-data, seabios, ipxe-qemu) through its built-in firmware path
# /usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu -- no -L option is needed.
#
# Prints the bin directory on stdout (everything else goes to stderr), so:
#   PATH=$(tests/lanes/build-outer-qemu.sh):$PATH tests/lanes/run-lane-k.sh ...
#
# Needs root on a Debian bookworm machine with apt access to Debian's mirrors.
# Environment:
#   LANEK_CACHE=dir          cache root (default tests/lanes/cache)
#   OUTER_QEMU_JOBS=N        parallel compile jobs (default nproc)
#   OUTER_QEMU_KEEP_BUILD=1  keep the unpacked source and build tree
#   LANEK_APT_UPDATE=0       never run apt-get update (lists must already have deb-src)
set -euo pipefail

LANES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${LANEK_CACHE:-$LANES_DIR/cache}
PATCH_DIR=$LANES_DIR/patches
JOBS=${OUTER_QEMU_JOBS:-$(nproc)}
SRC_LIST=/etc/apt/sources.list.d/hvmdm-deb-src.sources
BUILD_DEPS="dpkg-dev xz-utils patch gcc make pkg-config python3 ninja-build meson libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev"
FIRMWAREPATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
# Prefix outside /usr on purpose: QEMU relocates paths under its prefix relative to the
# binary, so the absolute Debian firmware path above stays absolute.
PREFIX=/opt/hvmdm-outer-qemu

log() { echo "build-outer-qemu: $*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s; }

# Only the pc (i440fx) board and what it selects; everything else off.
DEVICES_MAK='CONFIG_I440FX=y'
CONFIGURE_OPTS=(
    --target-list=x86_64-softmmu
    --prefix="$PREFIX"
    --firmwarepath="$FIRMWAREPATH"
    --without-default-features
    --without-default-devices
    --with-devices-x86_64=hvmdm-lanek
    --enable-tcg
    --enable-fdt=system
    --disable-install-blobs
    --disable-debug-info
    --disable-werror
    --with-git-submodules=ignore
)

[ "$(id -u)" = 0 ] || die "run as root (apt-get)"
command -v dpkg-query > /dev/null || die "not a Debian system"

# The source version matching the installed (or to-be-installed) qemu-system-x86.
src_version() {
    local v
    v=$(dpkg-query -W -f '${db:Status-Abbrev} ${source:Version}\n' qemu-system-x86 2>/dev/null \
        | awk '$1 == "ii" { print $2 }')
    if [ -z "$v" ]; then
        # Not installed: the candidate's source version (binNMU suffix +bN stripped).
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }' | sed 's/+b[0-9]*$//')
    fi
    [ -n "$v" ] && [ "$v" != "(none)" ] || die "cannot determine the qemu-system-x86 version"
    echo "$v"
}

VERSION=$(src_version)
KEY=$( { echo "$VERSION"; printf '%s\n' "${CONFIGURE_OPTS[@]}"; echo "$DEVICES_MAK";
         cat "$PATCH_DIR"/*.patch; } | sha256sum | cut -c1-16)
DEST=$CACHE/outer-qemu/${VERSION//[:~]/_}-$KEY
BIN=$DEST/bin/qemu-system-x86_64

if [ -x "$BIN" ]; then
    log "cached: $BIN"
    echo "$DEST/bin"
    exit 0
fi

T0=$(now)
log "building qemu $VERSION + $(ls "$PATCH_DIR"/*.patch | wc -l) patch(es) -> $DEST (jobs=$JOBS)"

# deb-src: copy Debian's existing stanzas with Types: deb-src (no host names written here).
apt_updated=0
have_src() { apt-cache showsrc qemu 2>/dev/null | grep -cx "Version: $VERSION" > /dev/null; }
if ! have_src; then
    [ "${LANEK_APT_UPDATE:-1}" != 0 ] || die "no deb-src for qemu $VERSION and LANEK_APT_UPDATE=0"
    if [ ! -f "$SRC_LIST" ]; then
        base=/etc/apt/sources.list.d/debian.sources
        [ -f "$base" ] || die "$base missing; cannot derive a deb-src entry"
        sed 's/^Types:.*/Types: deb-src/' "$base" > "$SRC_LIST"
        log "added $SRC_LIST"
    fi
    log "apt-get update"
    apt-get update -qq >&2
    apt_updated=1
    have_src || die "qemu source $VERSION not available"
fi

missing=()
for p in $BUILD_DEPS; do
    dpkg-query -W -f '${db:Status-Abbrev}\n' "$p" 2>/dev/null | grep -c '^ii' > /dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$apt_updated" = 0 ] && [ "${LANEK_APT_UPDATE:-1}" != 0 ]; then apt-get update -qq >&2; fi
    log "installing build deps: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
T_DEPS=$(now)

WORK=$CACHE/outer-qemu/build-$KEY
rm -rf "$CACHE"/outer-qemu/build-*
mkdir -p "$WORK"
cd "$WORK"
# _apt cannot write into root-owned dirs; that only costs a warning, so keep it quiet.
apt-get source -qq --only-source "qemu=$VERSION" > source.log 2>&1 || { cat source.log >&2; die "apt-get source failed"; }
SRC=$(find "$WORK" -maxdepth 1 -mindepth 1 -type d -name 'qemu-*' | head -1)
[ -n "$SRC" ] && [ -f "$SRC/configure" ] || die "apt-get source gave no qemu tree"
T_SRC=$(now)

for p in "$PATCH_DIR"/*.patch; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --quiet < "$p" >&2 || die "patch $p failed"
done
printf '%s\n' "$DEVICES_MAK" > "$SRC/configs/devices/x86_64-softmmu/hvmdm-lanek.mak"

mkdir -p "$SRC/build-lanek"
cd "$SRC/build-lanek"
../configure "${CONFIGURE_OPTS[@]}" --with-pkgversion="Debian $VERSION + hvmdm lane-K $KEY" > configure.log 2>&1 \
    || { tail -n 40 configure.log >&2; die "configure failed"; }
T_CONF=$(now)
ninja -j "$JOBS" qemu-system-x86_64 > ninja.log 2>&1 || { tail -n 40 ninja.log >&2; die "build failed"; }
T_BUILD=$(now)

mkdir -p "$DEST/bin.tmp"
install -m 0755 -s qemu-system-x86_64 "$DEST/bin.tmp/qemu-system-x86_64"
# Smoke test on the installed copy (in the build tree QEMU would search its qemu-bundle/):
# TCG + pc machine start and find Debian's SeaBIOS (a missing BIOS exits at once);
# still running when timeout kills it = ok.
"$DEST/bin.tmp/qemu-system-x86_64" -version >&2
rc=0
timeout 5 "$DEST/bin.tmp/qemu-system-x86_64" -accel tcg -cpu max -machine pc -m 64 -nodefaults -no-user-config \
    -display none -serial none -monitor none < /dev/null > smoke.log 2>&1 || rc=$?
[ "$rc" = 124 ] || { cat smoke.log >&2; die "smoke test: qemu exited with $rc"; }

{
    echo "version=$VERSION key=$KEY"
    echo "patches=$(cd "$PATCH_DIR" && ls *.patch | tr '\n' ' ')"
    echo "configure=${CONFIGURE_OPTS[*]}"
    echo "devices=$DEVICES_MAK"
    echo "jobs=$JOBS nproc=$(nproc)"
    echo "seconds: deps=$((T_DEPS - T0)) source=$((T_SRC - T_DEPS)) configure=$((T_CONF - T_SRC)) build=$((T_BUILD - T_CONF)) total=$(( $(now) - T0 ))"
} > "$DEST/BUILD-INFO"
rm -rf "$DEST/bin"
mv "$DEST/bin.tmp" "$DEST/bin"

cd /
[ "${OUTER_QEMU_KEEP_BUILD:-0}" = 1 ] || rm -rf "$WORK"
log "$(tail -n 1 "$DEST/BUILD-INFO")"
log "installed $BIN ($(du -sh "$DEST" | cut -f1))"
echo "$DEST/bin"
