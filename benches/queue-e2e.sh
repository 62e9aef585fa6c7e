#!/usr/bin/env bash
# The queue measured with real Nix, side by side with stock Nix from the same run: three member
# machines (real Nix 2.8 daemons, max-jobs = 0) × 6 builds of 4 s on real sshd builders with
# their own stores, through nixdispatch (hook, agents, scheduler) and through the stock
# build-remote with the builders in the members' nix.conf; a kill -9 of the scheduler for 2 s;
# a third builder that alone serves i686-linux and kvm builds. The numbers are the builders'
# own start/end stamps. Needs what the e2e tests need: root, nix-bin, openssh-server,
# busybox-static.
#   bash benches/queue-e2e.sh      (the tables go to stdout; see docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
out=$(mktemp)
log=$(mktemp)
kept=()
cleanup() { rm -f "$out" "$log"; for d in "${kept[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
# The test directories are kept (their hooks' logs) for the breakdown of the idle gaps.
NIXDISPATCH_BENCH_OUT=$out NIXDISPATCH_E2E_KEEP=1 \
  cargo test --release -p nixdispatch --test e2e_queue -- --nocapture --test-threads 1 >"$log" 2>&1 \
  || { tail -60 "$log" >&2; echo "benchmark failed (test directories kept: $(sed -n 's/^kept //p' "$log" | tr '\n' ' ')); rerun: NIXDISPATCH_BENCH_OUT=/tmp/q cargo test --release -p nixdispatch --test e2e_queue -- --nocapture --test-threads 1" >&2; exit 1; }
mapfile -t kept < <(sed -n 's/^kept //p' "$log")
echo "nix $(nix --version | awk '{print $3}'), $(nproc) cores, $(date -u +%Y-%m-%d), load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo
cat "$out"
echo
echo "### Where the idle gaps go (hooks' logs against the builders' stamps)"
for d in "${kept[@]}"; do
  if compgen -G "$d/stamps-direct*" >/dev/null; then
    for run in stamps-direct stamps-queue; do
      echo
      python3 benches/queue-gaps.py "$d" "$run"
    done
  fi
done
