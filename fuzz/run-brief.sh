#!/usr/bin/env bash
# Runs every fuzz target briefly: first replays the saved findings (they must pass outside strict
# mode), then fuzzes each target for SECONDS (default 20) from its corpus in fuzz/corpus/<target>.
# Exits non-zero if any target crashes, hangs (10 s per input), leaks or fails to build.
#
# Usage: fuzz/run-brief.sh [SECONDS]
# cargo-fuzz needs nightly-only rustc flags; on the stable toolchain RUSTC_BOOTSTRAP=1 unlocks
# them (see fuzz/README.md). cargo-fuzz itself is installed from crates.io if missing.
set -uo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS]" >&2
	exit 2
	;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2

targets=(fw_cfg_dma pci_config bus_rules ide_regs_prd atapi ahci qmp_session dm_argv ioreq qcow2)
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
	cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked || exit 2
fi

export RUSTC_BOOTSTRAP=1
# The bus findings are fixed (devices/src/bus.rs tests fuzz_finding_*): check them strictly.
export HVMDM_FUZZ_STRICT="${HVMDM_FUZZ_STRICT:-1}"

echo "== building fuzz targets ($(cargo fuzz --version))"
if ! cargo fuzz build; then
	echo "fuzz: build failed" >&2
	exit 1
fi

failed=()
summary=()
for t in "${targets[@]}"; do
	corpus="fuzz/corpus/$t"
	mkdir -p "$corpus" "fuzz/artifacts/$t"
	if compgen -G "fuzz/findings/$t/*" >/dev/null; then
		echo "== $t: replaying fuzz/findings/$t"
		if ! cargo fuzz run "$t" fuzz/findings/"$t"/* -- -runs=1; then
			failed+=("$t (findings replay)")
			continue
		fi
	fi
	echo "== $t: fuzzing for ${secs}s"
	log="fuzz/artifacts/$t/run-brief.log"
	cargo fuzz run "$t" "$corpus" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 2>&1 | tee "$log" | grep -E '^(#[0-9]+.*(INITED|DONE|pulse)|Done |stat::number_of_executed_units|==[0-9]+==|thread .* panicked)' || true
	rc=${PIPESTATUS[0]}
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	if [ "$rc" -ne 0 ]; then
		failed+=("$t")
		summary+=("$t: FAILED (exit $rc) after ${runs:-?} execs; see $log and fuzz/artifacts/$t/")
		grep -A8 -E 'panicked|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$log" | head -40
	else
		summary+=("$t: ok, ${runs:-?} execs in ${secs}s")
	fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
	echo "fuzz: failures in: ${failed[*]}" >&2
	exit 1
fi
echo "fuzz: all ${#targets[@]} targets ok"
