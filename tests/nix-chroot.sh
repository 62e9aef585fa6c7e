#!/usr/bin/env bash
# Makes sure a Debian chroot with that suite's Nix exists, and prints its path.
#
#   tests/nix-chroot.sh trixie    # Nix 2.26: build-hook in nix.conf is ignored
#   tests/nix-chroot.sh sid       # Nix 2.34
#
# The end-to-end tests run other Nix versions than the host's by starting the chroot's
# binaries with a per-test /nix bind-mounted in (tests/common/nixver.rs). A chroot costs
# 30 s to 3 min and about 500 MiB, so it is cached outside the clone (CI starts from a fresh
# clone every time) under $NIXDISPATCH_E2E_CHROOTS (default /var/cache/nixdispatch-e2e),
# one directory per suite, and rebuilt when it is missing or its Nix does not run. A lock
# keeps concurrent runs from building the same chroot twice.
#
# The mirror is the one this machine's apt already uses, read from its sources at run time.
# Needs root, apt and network access to that mirror; installs debootstrap when missing.
set -euo pipefail

suite=${1:?usage: tests/nix-chroot.sh SUITE}
cache=${NIXDISPATCH_E2E_CHROOTS:-/var/cache/nixdispatch-e2e}
root=$cache/$suite
log() { echo "tests/nix-chroot.sh: $*" >&2; }

# The chroot's Nix needs /proc (it reads /proc/self/exe). A private mount namespace
# unmounts it again when the command ends, whatever happens.
in_chroot() {
  unshare --mount --propagation private -- sh -c \
    'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$1" "${@:2}"
}

healthy() {
  [ -f "$1/.nixdispatch-ready" ] && in_chroot "$1" nix-daemon --version >/dev/null 2>&1
}

mirror() {
  local uri
  uri=$(awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ { print $2; exit }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 !~ /security/ { print $2; exit }' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  [ -n "$uri" ] || { log "no Debian mirror in /etc/apt sources"; exit 1; }
  echo "$uri"
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if ! healthy "$root"; then
  [ -e "$root" ] && log "$suite chroot at $root is broken: rebuilding"
  command -v debootstrap >/dev/null 2>&1 || {
    log "installing debootstrap"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2
  }
  rm -rf "$root" "$root.tmp"
  log "debootstrap $suite into $root (first run only; 30 s to 3 min)"
  # nix-bin cannot be part of --include: debootstrap does not resolve one of its virtual
  # dependencies. Install it in a second step.
  debootstrap --variant=minbase "$suite" "$root.tmp" "$(mirror)" >&2
  in_chroot "$root.tmp" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends nix-bin busybox-static openssh-server openssh-client >&2
  in_chroot "$root.tmp" apt-get clean >&2
  in_chroot "$root.tmp" nix-daemon --version >"$root.tmp/.nixdispatch-ready"
  mv "$root.tmp" "$root"
  log "$suite: $(cat "$root/.nixdispatch-ready")"
fi
# Mount points for a test's own /nix and for sshd's privilege separation directory.
mkdir -p "$root/nix" "$root/run/sshd"
echo "$root"
