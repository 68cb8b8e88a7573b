#!/bin/bash
# build-dom0.sh: lane X's hypervisor, dom0 kernel and dom0 root fs, cached under
# tests/lanex/cache/dom0/:
#   xen          Xen 4.17 from xen-hypervisor-4.17-amd64 (decompressed: ELF32 with a multiboot1
#                header, loadable by QEMU's -kernel)
#   vmlinuz      Debian's current linux-image-*-amd64 (the same kernel lane K's guest kit uses)
#   dom0.cpio    uncompressed newc cpio: debootstrap --variant=minbase bookworm root fs with the
#                Xen toolstack, qemu-system-xen, syslinux/mtools, and the kernel's Xen/bridge/tun/
#                loop modules (uncompressed, depmod'ed). No /init: run-lane-x.sh appends an overlay.
#   KEY          versions + script hash the build was made from
#   dom0.files   the root fs listing (run-lane-x.sh adds only the hvmdm libraries dom0 lacks)
#   XEN_VERSION  the Debian version of the hypervisor and tools actually packed (the same)
# Prints the directory on stdout. Idempotent: does nothing when KEY is unchanged.
# debootstrap's downloaded packages are kept in cache/debootstrap-debs (--cache-dir) so a
# rebuild after a script change does not download them again.
#
# Environment: LANEX_CACHE (default tests/lanex/cache), LANEX_MIRROR (default: apt's own).
source "$(dirname "$0")/lib.sh"

INCLUDE="xen-utils-$XEN_SERIES,xenstore-utils,qemu-system-xen,kmod,procps,iproute2,busybox,syslinux,syslinux-common,mtools,dosfstools"
# Modules dom0 needs beyond drivers/xen (all of which are packed); dependencies are resolved.
EXTRA_MODULES="xen-blkback xen-netback tun bridge loop"

need_root
ensure_cmd debootstrap debootstrap
ensure_cmd cpio cpio
ensure_cmd dpkg-deb dpkg
ensure_cmd depmod kmod

t0=$(now)
apt_resolve
kpkg=$LANEK_KPKG
kver=${kpkg#linux-image-}
xpkg=xen-hypervisor-$XEN_SERIES-amd64
xver=$(pkg_version "$xpkg")
[ -n "$xver" ] || die "no candidate version for $xpkg"
shash=$(hash_files "$0" "$LANEX_DIR/lib.sh" | cut -c1-8)
key="xen-candidate=${xver##*:} kernel=$kver/$LANEK_KPKG_VER include=$INCLUDE script=$shash"

D=$XCACHE/dom0
mkdir -p "$D"
if [ -f "$D/KEY" ] && [ "$(cat "$D/KEY")" = "$key" ] && [ -f "$D/xen" ] && [ -f "$D/vmlinuz" ] && [ -f "$D/dom0.cpio" ] && [ -f "$D/dom0.files" ]; then
    log "dom0 cache up to date ($key)"
    echo "$D"
    exit 0
fi
log "building dom0 ($key)"
rm -f "$D/KEY"

kdeb=$(fetch_deb "$kpkg")       # shared with lane K's cache

work=$(mktemp -d "$XCACHE/work.XXXXXX")
# debootstrap mounts proc/sys inside the target; never let rm -rf walk into a live mount.
cleanup() {
    local m
    for m in $(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# Root fs; debootstrap keeps the packages it used in our cache (--cache-dir).
t1=$(now)
root=$work/root
mirror=${LANEX_MIRROR:-$(debian_mirror)}
mkdir -p "$XCACHE/debootstrap-debs"
if ! debootstrap --variant=minbase --cache-dir="$XCACHE/debootstrap-debs" --include="$INCLUDE" \
        bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
fi
log "debootstrap in $(elapsed "$t1") s ($(du -sm "$root" | cut -f1) MB)"

# The hypervisor at exactly the version of the tools debootstrap installed (debootstrap only
# sees the main suite, apt's candidate may come from the security suite): libxl and Xen then
# come from the same build.
t1=$(now)
tver=$(awk '/^Package: xen-utils-'"$XEN_SERIES"'$/ { f = 1 } f && /^Version:/ { print $2; exit }' "$root/var/lib/dpkg/status")
[ -n "$tver" ] || die "xen-utils-$XEN_SERIES not installed in the root fs"
xdeb=$(fetch_xdeb "$xpkg" "$tver")
extract_deb "$xdeb" "$work/xen"
xgz=$(ls "$work"/xen/boot/xen-*-amd64.gz | head -1)
[ -n "$xgz" ] || die "no boot/xen-*.gz in $xdeb"
zcat "$xgz" > "$D/xen.tmp" && mv "$D/xen.tmp" "$D/xen"
extract_deb "$kdeb" "$work/kernel"
cp "$work/kernel/boot/vmlinuz-$kver" "$D/vmlinuz.tmp" && mv "$D/vmlinuz.tmp" "$D/vmlinuz"
log "xen $tver + kernel $kver extracted in $(elapsed "$t1") s"

# Prune what a throw-away dom0 never reads.
rm -rf "$root"/usr/share/{doc,man,info,lintian,linda,bug,groff,iso-codes} "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/usr/lib/udev/hwdb.bin "$root"/etc/udev/hwdb.bin
find "$root/usr/lib/python3" "$root/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
find "$root/usr/share/i18n" -mindepth 1 -delete 2>/dev/null || true
# Guest firmware and tools stay; dom0 needs nothing from these.
rm -rf "$root"/usr/share/{zoneinfo,perl}

# Kernel modules: all of drivers/xen plus bridge/tun/loop with their dependencies.
mdir=$work/kernel/lib/modules/$kver
xenmods=$(cd "$mdir" && find kernel/drivers/xen -name '*.ko*' | sed 's,.*/,,; s,\.ko.*,,')
# shellcheck disable=SC2086
copy_modules "$mdir" "$root" $xenmods $EXTRA_MODULES 2> "$work/modules.log"
rm -f "$root/etc/modules.load"
cp "$mdir"/modules.builtin* "$mdir"/modules.order "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

# Mount points and a machine identity the init script expects.
mkdir -p "$root"/{proc,sys,dev,run,tmp,var/log/xen,var/lib/xen,run/xen,run/xenstored,lanex}
echo dom0 > "$root/etc/hostname"
printf 'autoballoon="off"\n' > "$root/etc/xen/xl.conf"

t1=$(now)
(cd "$root" && find . -mindepth 1 | sed 's,^\./,,' | LC_ALL=C sort) > "$D/dom0.files"
mkcpio "$root" "$D/dom0.cpio.tmp"
mv "$D/dom0.cpio.tmp" "$D/dom0.cpio"
log "dom0.cpio $(( $(stat -c %s "$D/dom0.cpio") / 1048576 )) MB packed in $(elapsed "$t1") s"

# Drop superseded lane-X packages.
find "$XCACHE/debs" -maxdepth 1 -name '*.deb' ! -name "$(basename "$xdeb")" -delete
echo "$key" > "$D/KEY"
echo "$tver" > "$D/XEN_VERSION"
log "dom0 ready in $(elapsed "$t0") s"
echo "$D"
