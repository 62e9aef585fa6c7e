#!/usr/bin/env bash
# Measures what nixdispatch-gate costs a member against the same real SSH builder without it,
# alternating the two in one run: upload throughput (ssh:// and ssh-ng://) and connect +
# handshake time. Needs what the e2e tests need: root, nix-bin, openssh-server,
# busybox-static.
#   bash benches/gate-overhead.sh [ROUNDS] [UPLOAD_MIB] [PINGS] [LOCAL]   (defaults 5, 256, 10, 100)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
mib=${2:-256}
pings=${3:-10}
local=${4:-100}
cargo build --release --workspace --bins
out=$(mktemp)
NIXDISPATCH_BENCH_ROUNDS=$rounds NIXDISPATCH_BENCH_UPLOAD_BYTES=$((mib << 20)) NIXDISPATCH_BENCH_PINGS=$pings NIXDISPATCH_BENCH_LOCAL=$local \
  NIXDISPATCH_BENCH_OUT=$out \
  cargo test --release -p nixdispatch --test e2e_gate_overhead -- --nocapture >/dev/null 2>&1 \
  || { echo "benchmark failed; rerun: cargo test --release -p nixdispatch --test e2e_gate_overhead -- --nocapture" >&2; exit 1; }
echo "nix $(nix --version | awk '{print $3}'), $(nproc) cores, $(date -u +%Y-%m-%d)"
cat "$out"
rm -f "$out"
