#!/bin/sh
# Stand-in "hvmdm" for proving lane X's hvmdm plumbing (overlay copy to /lanex/bin/hvmdm,
# device_model_override, hvmdm-* scenarios) before hvmdm serves Xen guests:
#   sudo HVMDM_BIN=tests/lanex/selftest/fake-hvmdm.sh tests/lanex/run-lane-x.sh hvmdm-ide
# It hands libxl's argv to Debian's qemu-xen at its installed path (QEMU finds its data files
# relative to its own location, so the binary itself cannot be copied to /lanex/bin).
exec /usr/libexec/xen-qemu-system-i386 "$@"
