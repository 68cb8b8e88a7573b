#!/bin/bash
# make-disk.sh OUT [MIB]: deterministic raw test disk (default 16 MiB) and OUT.sha256.
# Every 64-byte line names its LBA and offset, so misplaced or reordered sectors
# change the checksum and are easy to spot in a hex dump.
set -eu
out=$1
mib=${2:-16}
sectors=$((mib * 2048))
awk -v n="$sectors" 'BEGIN {
    for (lba = 0; lba < n; lba++)
        for (off = 0; off < 512; off += 64)
            printf "HVMDM lba=%08d off=%03d %-36s\n", lba, off, sprintf("x%07x", (lba * 2654435761 + off) % 268435456)
}' > "$out.tmp"
size=$(stat -c %s "$out.tmp")
[ "$size" = $((mib * 1048576)) ] || { echo "make-disk: wrong size $size" >&2; exit 1; }
mv "$out.tmp" "$out"
sha256sum < "$out" | cut -d' ' -f1 > "$out.sha256"
