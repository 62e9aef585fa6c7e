#!/usr/bin/env bash
# Measures the time nixdispatch-hook adds per nix-build against Nix's stock build-remote, on
# the same trivial builds on the same real SSH builder (own store, loopback), alternating the
# two in one run. Needs what the e2e tests need: root, nix-bin, openssh-server, busybox-static.
#   bash benches/hook-overhead.sh [ROUNDS]      (default 10; the table goes to stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
cargo build --release --workspace --bins
out=$(mktemp)
NIXDISPATCH_BENCH_ROUNDS=$rounds NIXDISPATCH_BENCH_OUT=$out \
  cargo test --release -p nixdispatch --test e2e_hook_overhead -- --nocapture >/dev/null 2>&1 \
  || { echo "benchmark failed; rerun: cargo test --release -p nixdispatch --test e2e_hook_overhead -- --nocapture" >&2; exit 1; }
echo "nix $(nix --version | awk '{print $3}'), $(nproc) cores, $(date -u +%Y-%m-%d)"
cat "$out"
rm -f "$out"
