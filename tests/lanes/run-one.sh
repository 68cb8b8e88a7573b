#!/bin/sh
# run-one.sh SCENARIO-FILE DIR: runs one scenario inside the outer VM (started by
# /init with stdout = L2 serial log, stderr = VMM log). Provides the per-run
# placeholders, then calls the scenario's scenario_cmd.
f=$1
dir=$2
cd "$dir" || exit 125
export DISK="$dir/disk.img"            # fresh copy of the kit's test disk
export FW_LOG="$dir/fw.log"            # firmware debug log (SeaBIOS port 0x402)
export OVMF_VARS="$dir/OVMF_VARS.fd"   # fresh writable OVMF variable store
export RUN_DIR="$dir"
cp /kit/disk.img "$DISK" || exit 125
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$OVMF_VARS" 2>/dev/null
SCENARIO_APPEND=
. "$f"
export GUEST_APPEND="$GUEST_APPEND_BASE $SCENARIO_APPEND"
scenario_cmd
