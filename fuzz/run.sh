#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time, one after the other, at the
# lowest CPU and I/O priority, and writes the results to docs/benchmarks/fuzz.md.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   FUZZ_RUNS=10000000 fuzz/run.sh 7200      # each target until 10 M executions (or 2 h)
#
# SECONDS_PER_TARGET defaults to 60 (a quick pass). FUZZ_RUNS, when set, also stops each
# target after that many executions (libFuzzer's -runs), whichever comes first; the published
# table comes from a run to 10 million executions. Needs `cargo install cargo-fuzz`; runs on the stable toolchain with RUSTC_BOOTSTRAP=1.
# The corpora (fuzz/corpus/<target>, seeded from the repository's fixtures) and crash
# artifacts (fuzz/artifacts/<target>) are kept between runs and never committed. Exits
# non-zero if any target crashed.
set -euo pipefail

cd "$(dirname "$0")"
root=$(cd .. && pwd)
seconds=${1:-60}
shift || true
all=(scheduler_convert scheduler_core hook_machine hook_codec agent_proc agent_nix_config
    config_scheduler config_agent config_hook gate_session)
targets=("${@:-${all[@]}}")
out=$root/docs/benchmarks/fuzz.md
logs=$(mktemp -d)

nice_cmd=(nice -n 19)
if command -v ionice >/dev/null; then nice_cmd+=(ionice -c3); fi
# Release build with debug assertions, so that arithmetic overflow is a finding too. Without
# AddressSanitizer: the workspace denies `unsafe_code` (the exceptions, the agent's statvfs
# and getpwuid_r/getpwnam_r calls, are not fuzzed), so ASan could only find bugs in dependencies, and it
# cost a factor of about five in executions per second.
build_flags=(--debug-assertions --sanitizer none)
libfuzzer_flags=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
if [ -n "${FUZZ_RUNS:-}" ]; then libfuzzer_flags+=(-runs="$FUZZ_RUNS"); fi

# Seeds: one file per real input the parsers see, prefixed with the target's selector byte
# where the target has one (see each target's documentation).
seed() { # target name selector-byte-or-empty files...
    local dir=corpus/$1 name=$2 sel=$3
    shift 3
    mkdir -p "$dir"
    { if [ -n "$sel" ]; then printf "\\x$sel"; fi; cat "$@"; } >"$dir/seed-$name"
}
seeds() {
    local f=$root/agent/tests/fixtures
    seed agent_proc loadavg 00 "$f/linux/loadavg"
    for p in cpu io memory; do seed agent_proc "pressure-$p" 01 "$f/linux/pressure-$p"; done
    seed agent_proc meminfo 02 "$f/linux/meminfo"
    cut -d' ' -f2- "$f/linux/proc-snapshot" | head -50 >"$logs/stat"
    seed agent_proc stat 03 "$logs/stat"
    printf '\0' >"$logs/nul"
    printf '\0nixbld' >"$logs/nul-nixbld"
    seed agent_proc build-users 04 "$f/linux/group" "$logs/nul" "$f/linux/passwd" "$logs/nul-nixbld"
    seed agent_proc dscl 05 "$f/macos/dscl-group-nixbld" "$logs/nul" \
        "$f/macos/dscl-users-uniqueid" "$logs/nul" "$f/macos/dscl-users-primarygroupid"
    seed agent_nix_config nix-2.8 08 "$f/nix/show-config-2.8.json"
    seed agent_nix_config nix-2.24 08 "$f/nix/config-show-2.24.json"
    echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b1' \
        >"$logs/key"
    seed agent_nix_config host-key 01 "$logs/key"
    seed config_scheduler example "" "$root/deploy/scheduler/scheduler.example.toml"
    seed config_agent example "" "$root/deploy/agent/agent.toml"
    cat >"$logs/agent.toml" <<'TOML'
scheduler = "https://scheduler.example.org:50051"
host_id = "builder-1"
store_uri = "ssh-ng://nix@builder-1.example.org"
systems = ["x86_64-linux", "i686-linux"]
features = ["kvm", "big-parallel"]
mandatory_features = []
max_jobs = 8
speed_factor = 2.5
build_users_group = "nixbld"
[timing]
report_at_fraction = 0.5
connect_timeout_millis = 5000
reconnect_initial_millis = 100
reconnect_max_millis = 30000
TOML
    seed config_agent full "" "$logs/agent.toml"
    cat >"$logs/hook.toml" <<'TOML'
scheduler = "https://scheduler.example.org:50051"
client_id = "alice-laptop"
ssh_identity = "/root/.ssh/id_ed25519"
build_remote = ["/run/current-system/sw/bin/nix", "__build-remote"]
max_host_attempts = 3
log_level = "info"
[timeouts]
connect_millis = 1000
try_millis = 1500
rpc_millis = 3000
TOML
    seed config_hook full "" "$logs/hook.toml"
}

echo "building the targets" >&2
"${nice_cmd[@]}" env RUSTC_BOOTSTRAP=1 cargo fuzz build "${build_flags[@]}" >&2
seeds

status=0
rows=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzzing $t for ${seconds}s" >&2
    log=$logs/$t.log
    start=$(date +%s)
    if "${nice_cmd[@]}" env RUSTC_BOOTSTRAP=1 cargo fuzz run "${build_flags[@]}" "$t" \
        -- "${libfuzzer_flags[@]}" >"$log" 2>&1; then
        crashes=0
    else
        crashes=1
        status=1
        echo "$t crashed; see $log and fuzz/artifacts/$t" >&2
        grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" >&2 || true
    fi
    # libFuzzer's own count of the seconds it fuzzed (the wall time includes any build).
    elapsed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    elapsed=${elapsed:-$(($(date +%s) - start))}
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    rows+=("| \`$t\` | ${execs:-?} | $elapsed | ${rate:-?} | $corpus | $crashes | ${rss:-?} | $(git -C "$root" rev-parse --short HEAD) | $(date -u +%Y-%m-%d) |")
    echo "${rows[-1]}" >&2
done

commit=$(git -C "$root" rev-parse --short HEAD)
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
# Rows of targets not run this time are kept from the published table.
declare -A row
# The hand-written findings at the end of the published file are kept as they are.
findings=$logs/findings.md
touch "$findings"
if [ -f "$out" ]; then
    sed -n '/^## Findings/,$p' "$out" >"$findings"
    while IFS= read -r line; do
        name=$(sed -n 's/^| `\([a-z_]*\)` |.*/\1/p' <<<"$line")
        if [ -n "$name" ]; then row[$name]=$line; fi
    done <"$out"
fi
for r in "${rows[@]}"; do
    name=$(sed -n 's/^| `\([a-z_]*\)` |.*/\1/p' <<<"$r")
    row[$name]=$r
done
{
    echo "# Fuzzing"
    echo
    echo "Every \`cargo fuzz\` target in \`fuzz/fuzz_targets/\`, run by \`fuzz/run.sh SECONDS [TARGET...]\`"
    echo "one after the other at \`nice -n 19\` (and \`ionice -c3\`), on a machine shared with other"
    echo "engineers' builds and tests: $(nproc) cores ($cpu). What each target feeds and checks"
    echo "is documented at the top of its file. Each row is one run of:"
    echo
    echo '```sh'
    echo "cd fuzz && nice -n 19 ionice -c3 env RUSTC_BOOTSTRAP=1 \\"
    echo "    cargo fuzz run ${build_flags[*]} <target> -- -max_total_time=<seconds> [-runs=<executions>] -timeout=10 -print_final_stats=1"
    echo '```'
    echo
    echo "starting from the corpus earlier runs left (seeded from the repository's fixtures)."
    echo
    echo "| target | executions | seconds | exec/s | corpus files | crashes | peak RSS (MiB) | commit | date |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
    for t in "${all[@]}"; do
        if [ -n "${row[$t]:-}" ]; then echo "${row[$t]}"; fi
    done
    if [ -s "$findings" ]; then
        echo
        cat "$findings"
    fi
} >"$out"
exit $status
