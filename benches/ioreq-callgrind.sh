#!/bin/bash
# benches/ioreq-callgrind.sh: instructions per ioreq in the unit lane (a benchmark, not a test;
# CI does not run it). Builds xen/examples/ioreq_bench.rs (release profile), runs it under
# `valgrind --tool=callgrind` for two request counts per handler and prints
#   Ir per ioreq = (Ir(N2) - Ir(N1)) / (N2 - N1)
# which cancels start-up, server set-up and teardown. Handlers: trivial (constant answer: the
# ioreq path alone, FakeXen's bookkeeping included), i8042 (Bus + chipset I8042, status port
# 0x64: the port benches/xen.sh measures in the guest), cmos (same Bus, CMOS data port 0x71).
# The i8042/cmos minus trivial difference is the device side (Bus dispatch + device). Column
# "dm" leaves out the instructions of FakeXen (Xen's side: hvmdm_xen::fake::*) and of the
# example's main loop (self cost per function, callgrind_annotate): what hvmdm itself executes.
#
# Environment: BENCH_N1 (default 20000), BENCH_N2 (default 120000), BENCH_HANDLERS (default
# "trivial i8042 cmos"), BENCH_OUT (default benches/out/ioreq), CARGO_TARGET_DIR (as cargo).
set -eu
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
N1=${BENCH_N1:-20000}
N2=${BENCH_N2:-120000}
HANDLERS=${BENCH_HANDLERS:-trivial i8042 cmos}
OUT=${BENCH_OUT:-$BENCH_DIR/out/ioreq}
[ "$N2" -gt "$N1" ] 2>/dev/null || { echo "ioreq-callgrind.sh: need BENCH_N2 > BENCH_N1" >&2; exit 1; }
if ! command -v valgrind > /dev/null; then
    echo "ioreq-callgrind.sh: installing valgrind" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >&2
fi

cd "$REPO_DIR"
cargo build --release -q -p hvmdm-xen --example ioreq_bench
BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/examples/ioreq_bench
mkdir -p "$OUT"

# "TOTAL HARNESS": instructions executed by the whole program (callgrind's "summary:" line) and
# those in FakeXen's functions plus the example's main (self cost).
ir() { # HANDLER N
    local f=$OUT/callgrind.$1.$2
    valgrind --tool=callgrind --callgrind-out-file="$f" "$BIN" "$1" "$2" > "$f.stdout" 2> "$f.stderr"
    echo "$(awk '/^summary:/ { print $2; exit }' "$f")" \
        "$(callgrind_annotate --inclusive=no --threshold=100 "$f" 2>/dev/null |
            awk '/hvmdm_xen::fake::|ioreq_bench::main/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')"
}

printf '%-8s %14s %14s %10s %10s\n' handler "Ir(N1=$N1)" "Ir(N2=$N2)" "Ir/ioreq" "dm" | tee "$OUT/report.txt"
for h in $HANDLERS; do
    read -r a fa <<< "$(ir "$h" "$N1")"
    read -r b fb <<< "$(ir "$h" "$N2")"
    per=$(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.1f", (b - a) / (n2 - n1) }')
    dm=$(awk -v a="$((a - fa))" -v b="$((b - fb))" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.1f", (b - a) / (n2 - n1) }')
    printf '%-8s %14s %14s %10s %10s\n' "$h" "$a" "$b" "$per" "$dm" | tee -a "$OUT/report.txt"
done
echo "(callgrind_annotate $OUT/callgrind.<handler>.$N2 shows where the instructions go)" | tee -a "$OUT/report.txt"
