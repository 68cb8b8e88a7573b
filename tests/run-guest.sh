#!/usr/bin/env bash
# hvmdm's main job (README): boot the test guest — Debian's kernel + the project's busybox
# initramfs, SeaBIOS (or FIRMWARE=ovmf), a raw IDE disk — through hvmdm, and show its console.
# With hardware KVM it runs hvmdm directly; on a machine whose /dev/kvm is missing or is the
# software-only kvm_pvm, it runs the same boot inside lane K (a TCG VM with nested KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
FIRMWARE=${FIRMWARE:-seabios}
bash tests/setup.sh
cargo build --release
kit=$(bash tests/lanes/build-guest-kit.sh)
if [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then
    disk=$(mktemp /tmp/hvmdm-disk.XXXXXX)
    cp "$kit/disk.img" "$disk"
    echo "== hardware KVM: running hvmdm directly (firmware $FIRMWARE)"
    set +e
    target/release/hvmdm kvm --firmware "$FIRMWARE" --memory 512M --smp 2 \
        --kernel "$kit/vmlinuz" --initrd "$kit/initrd.cpio.gz" \
        --append "console=ttyS0 panic=-1 hvmdm.check=all" \
        --disk file="$disk",if=ide --serial stdio --firmware-log /tmp/hvmdm-fw.log < /dev/null
    rc=$?
    set -e
    rm -f "$disk"
    echo "== hvmdm exited with status $rc (expected disk checksum $(cut -d' ' -f1 "$kit/disk.img.sha256"))"
    exit $rc
fi
echo "== no hardware KVM here: booting the guest through lane K"
scenario=hvmdm-seabios-ide
[ "$FIRMWARE" = ovmf ] && scenario=hvmdm-ovmf-ide
LANEK_OUT=${LANEK_OUT:-/tmp/hvmdm-run-guest} bash tests/lanes/run-lane-k.sh "$scenario" || rc=$?
log=${LANEK_OUT:-/tmp/hvmdm-run-guest}/$scenario.log
echo "== guest console ($log):"
grep '^serial| ' "$log" | sed 's/^serial| //' | tail -40 || true
exit ${rc:-0}
