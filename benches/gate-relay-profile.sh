#!/usr/bin/env bash
# Profiles the gate's relay on an ssh-ng upload without SSH: a stand-in `ssh` on PATH runs
# the remote command (`nix-daemon --stdio --store DIR`) through the release gate under
# `strace -ff`, and this prints the system calls of the gate's main thread.
# Needs root, Debian's nix-bin and strace.
#   bash benches/gate-relay-profile.sh [UPLOAD_MIB]   (default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-64}
cargo build --release --bin nixdispatch-gate
gate=$(realpath "${CARGO_TARGET_DIR:-target}")/release/nixdispatch-gate
d=$(mktemp -d)
trap 'rm -rf "$d"; [ -n "${path:-}" ] && nix-store --delete "$path" >/dev/null 2>&1 || true' EXIT
mkdir "$d/bin"
printf 'scheduler = "http://127.0.0.1:9"\nhost_id = "profile"\n' > "$d/gate.toml"
cat > "$d/bin/ssh" <<STANDIN
#!/bin/sh
for a; do last=\$a; done
SSH_ORIGINAL_COMMAND="\$last" exec strace -ff -o "$d/st" "$gate" --config "$d/gate.toml" --member profile
STANDIN
chmod +x "$d/bin/ssh"
head -c $((mib << 20)) /dev/urandom > "$d/blob"
path=$(nix-store --add "$d/blob")
rm "$d/blob"
PATH=$d/bin:$PATH nix --experimental-features nix-command copy \
  --to "ssh-ng://profile?remote-store=$d/store" "$path"
[ -e "$d/store$path" ] || { echo "the upload did not arrive" >&2; exit 1; }
sleep 1
main=$(ls "$d"/st.* | sort -t. -k2 -n | head -1)
echo "nix $(nix --version | awk '{print $3}'), upload of $mib MiB through the gate; its main thread:"
awk -F'(' '/^[a-z_0-9]+\(/ {print $1}' "$main" | sort | uniq -c | sort -rn | head -5
awk '/^(read|write)\([0-9]+,/ && $NF > 0 {split($1, a, ","); n[a[1]]++; s[a[1]] += $NF}
  END {for (k in n) if (s[k] > 1048576) printf "%s): %d calls, %.0f KiB each\n", k, n[k], s[k] / n[k] / 1024}' "$main"
