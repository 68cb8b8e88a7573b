#!/usr/bin/env bash
# hvmdm's test command (README: "run all the tests"; .ci/run calls it).
#   1. installs Debian packages it needs (tests/setup.sh)
#   2. unit lane: cargo fmt --check, clippy -D warnings, cargo test (every crate)
#   3. lane K: real SeaBIOS/OVMF + Debian Linux guests on real KVM nested in a TCG VM
#      (tests/lanes/run-lane-k.sh builds and caches the guest kit and the outer VM)
# The last line is the lane-K checker's "N passed, M failed" summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

echo "== unit lane"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace 2>&1 | tee /tmp/hvmdm-unit.log
grep -q "test result: FAILED" /tmp/hvmdm-unit.log && { echo "unit lane failed"; exit 1; }

echo "== lane K"
cargo build --release
bash tests/lanes/run-lane-k.sh
