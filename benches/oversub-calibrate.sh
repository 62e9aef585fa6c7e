#!/usr/bin/env bash
# Calibrates the simulator's oversubscription model: what running 1x, 2x, 4x and 8x the
# machine's cores worth of real CPU-bound builds at once does to throughput, per-build time and
# memory. Writes docs/benchmarks/oversubscription.md (or $OUT).
#
#   bash benches/oversub-calibrate.sh [ROUNDS]        # default 3 rounds
#
# Each "build" is a real `nix-build` of a derivation that compresses a 6 MB buffer with
# `xz -6 -T1` (an 8 MiB dictionary and about 70 MiB resident, so the working set is far beyond
# the L2 cache and contends for L3 and memory bandwidth, as compilers and linkers do). For
# factor k, N = k x cores derivations are built by one `nix-build --max-jobs N --cores 1`, so
# all N run at once, as stock Nix runs a remote builder past its slots. Inside each build the
# builder records its own start, end, CPU seconds and peak RSS; the batch's throughput is
# N / (last end - first start). Rounds are interleaved (each round runs every factor, in a
# rotated order) because the machine may be shared: the load average is recorded before each
# batch and sampled during it, and the report states both.
#
# Needs: nix-build (a private chroot store under a temporary directory is used, so the
# system's /nix is not touched; building in it needs root for the sandbox), xz, GNU time at
# /usr/bin/time, awk.
set -euo pipefail

ROUNDS=${1:-3}
OUT=${OUT:-docs/benchmarks/oversubscription.md}
read -r -a FACTORS <<<"${FACTORS:-1 2 4 8}"
CORES=$(nproc)

for tool in nix-build xz /usr/bin/time awk; do
    command -v "$tool" >/dev/null || { echo "oversub-calibrate: $tool is required" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/oversub-calibrate.XXXXXX)
cleanup() {
    [[ -n "${SAMPLER:-}" ]] && kill "$SAMPLER" 2>/dev/null || true
    chmod -R u+w "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/data"
# Base64 of random bytes: compressible by about a quarter, so xz does real match finding.
head -c 4500000 /dev/urandom | base64 -w 100 >"$WORK/data/buf"
STORE="$WORK/store"

cat >"$WORK/batch.nix" <<'EOF'
{ n, nonce, data }:
let
  one = i: derivation {
    name = "oversub-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit nonce data;
    args = [ "-c" ''
      set -e
      export PATH=/usr/bin:/bin
      start=$(date +%s.%N)
      /usr/bin/time -f "%U %S %M" -o t xz -6 -T1 -c "$data/buf" > /dev/null
      end=$(date +%s.%N)
      echo "$start $end $(cat t)" > "$out"
    '' ];
  };
in builtins.genList one n
EOF

nixopts=(--store "$STORE" --option build-users-group "" --option sandbox true
    --option sandbox-paths "/bin /usr /lib /lib64 $WORK/data" --option substituters ""
    --cores 1 --quiet --no-out-link)

# One warm-up build, so that the store's creation is not measured.
nix-build "${nixopts[@]}" "$WORK/batch.nix" --arg n 1 --argstr nonce warmup \
    --argstr data "$WORK/data" --max-jobs 1 >/dev/null

loadavg() { cut -d' ' -f1 /proc/loadavg; }
memavail_mib() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }

RESULTS="$WORK/results.txt" # round k load_before load_during_mean memavail_before memavail_min start end user sys rss_kib
: >"$RESULTS"
for ((r = 1; r <= ROUNDS; r++)); do
    for ((j = 0; j < ${#FACTORS[@]}; j++)); do
        k=${FACTORS[$(((j + r - 1) % ${#FACTORS[@]}))]}
        n=$((k * CORES))
        before=$(loadavg)
        mem_before=$(memavail_mib)
        (while true; do echo "$(loadavg) $(memavail_mib)"; sleep 2; done) >"$WORK/samples" &
        SAMPLER=$!
        paths=$(nix-build "${nixopts[@]}" "$WORK/batch.nix" --arg n "$n" \
            --argstr nonce "r$r-k$k-$RANDOM" --argstr data "$WORK/data" --max-jobs "$n")
        kill "$SAMPLER"
        wait "$SAMPLER" 2>/dev/null || true
        SAMPLER=
        read -r during mem_min < <(awk -v m="$mem_before" '
            { s += $1; c++; if ($2 < m) m = $2 }
            END { printf "%.2f %d\n", (c ? s / c : 0), m }' "$WORK/samples")
        for p in $paths; do
            echo "$r $k $before $during $mem_before $mem_min $(cat "$STORE$p")" >>"$RESULTS"
        done
        echo "round $r, ${k}x ($n builds): load before $before, during $during" >&2
    done
done

# Per (round, k): makespan, throughput, mean per-build wall and CPU time, peak RSS.
awk -v cores="$CORES" '
{
    key = $1 " " $2; r[key] = $1; k[key] = $2
    lb[key] = $3; ld[key] = $4; mb[key] = $5; mm[key] = $6
    if (!(key in first) || $7 < first[key]) first[key] = $7
    if (!(key in last) || $8 > last[key]) last[key] = $8
    n[key]++; wall[key] += $8 - $7; cpu[key] += $9 + $10
    if ($11 > rss[key]) rss[key] = $11
}
END {
    for (key in n) {
        span = last[key] - first[key]
        printf "%d %d %d %.3f %.4f %.3f %.3f %.0f %.2f %.2f %d %d\n", r[key], k[key], n[key],
            span, n[key] / span, wall[key] / n[key], cpu[key] / n[key], rss[key] / 1024,
            lb[key], ld[key], mb[key], mm[key]
    }
}' "$RESULTS" | sort -n -k1,1 -k2,2 >"$WORK/batches.txt"

# Relative to 1x of the same round: throughput and CPU seconds per build.
awk '
{ key = $1 " " $2; line[NR] = $0; R[NR] = $1; K[NR] = $2; tp[key] = $5; cpu[key] = $7 }
END {
    for (i = 1; i <= NR; i++) {
        base = R[i] " 1"
        printf "%s %.3f %.3f\n", line[i], tp[R[i] " " K[i]] / tp[base], cpu[base] / cpu[R[i] " " K[i]]
    }
}' "$WORK/batches.txt" >"$WORK/rel.txt"

{
    echo "# Oversubscription on a ${CORES}-core machine (measured)"
    echo
    echo "Generated by \`bash benches/oversub-calibrate.sh $ROUNDS\` on $(date -u +%Y-%m-%d) at commit"
    echo "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`."
    echo
    echo "Machine: $(nproc) CPUs ($(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)),"
    echo "$(awk '/^MemTotal:/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) memory, no swap;"
    echo "L2 $(lscpu 2>/dev/null | awk -F': *' '/^L2 cache/ {print $2}'), L3 $(lscpu 2>/dev/null | awk -F': *' '/^L3 cache/ {print $2}');"
    echo "$(nix-build --version), $(xz --version | head -1)."
    echo
    echo "Each build is a real \`nix-build\` of a derivation compressing a 6 MB buffer with"
    echo "\`xz -6 -T1\` (about 70 MiB resident, beyond the L2 cache). For factor k, k x ${CORES}"
    echo "builds run at once (one \`nix-build --max-jobs N --cores 1\`). **throughput** = builds /"
    echo "(last end - first start) as the builders saw it; **rel.** = that throughput over the same"
    echo "round's 1x; **CPU eff.** = CPU seconds of a 1x build / CPU seconds of a build at k (below"
    echo "1 when sharing makes the same work cost more CPU: cache and memory contention, switches)."
    echo "**wall / build** = mean time from a build's start to its end. **load** = 1-minute load"
    echo "average before the batch and its mean during it (the machine may be shared: load from"
    echo "others lowers the absolute throughput of every factor alike, which is why factors are"
    echo "compared within a round). **mem avail. min** = the lowest MemAvailable sampled."
    echo
    echo "## Every batch"
    echo
    echo "| round | k | builds | makespan (s) | throughput (builds/s) | rel. | wall / build (s) | CPU / build (s) | CPU eff. | peak RSS / build (MiB) | load before / during | mem avail. before / min (MiB) |"
    echo "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    awk '{ printf "| %d | %dx | %d | %.1f | %.3f | %.3f | %.1f | %.2f | %.3f | %s | %s / %s | %s / %s |\n",
        $1, $2, $3, $4, $5, $13, $6, $7, $14, $8, $9, $10, $11, $12 }' "$WORK/rel.txt"
    echo
    echo "## Median over rounds"
    echo
    echo "| k | rel. throughput | CPU eff. | wall / build vs 1x | peak RSS / build (MiB) | memory for all builds (MiB) |"
    echo "|--:|--:|--:|--:|--:|--:|"
    for k in "${FACTORS[@]}"; do
        med() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
        rel=$(awk -v k="$k" '$2 == k { print $13 }' "$WORK/rel.txt" | med)
        eff=$(awk -v k="$k" '$2 == k { print $14 }' "$WORK/rel.txt" | med)
        stretch=$(awk -v k="$k" '
            $2 == 1 { b[$1] = $6 } $2 == k { w[$1] = $6 }
            END { for (r in w) print w[r] / b[r] }' "$WORK/rel.txt" | med)
        rss=$(awk -v k="$k" '$2 == k { print $8 }' "$WORK/rel.txt" | med)
        echo "| ${k}x | $rel | $eff | $(printf %.2f "$stretch") | $rss | $((k * CORES * ${rss%.*})) |"
    done
    echo
    echo "## Fit"
    echo
    echo "The simulator's bounded model: a host running k times its slots does a fraction"
    echo "\`1 - L x (1 - 1/k)\` of its work at 1x (it loses at most L, however far it is"
    echo "oversubscribed). Least squares over every batch, from the CPU efficiency (the CPU"
    echo "seconds the same work costs; other load on the machine does not change it):"
    awk '$2 > 1 { x = 1 - 1 / $2; y = 1 - $14; sxy += x * y; sxx += x * x }
        END { printf "**L = %.3f**", (sxx ? sxy / sxx : 0) }' "$WORK/rel.txt"
    echo ". From the wall-clock throughput instead:"
    awk '$2 > 1 { x = 1 - 1 / $2; y = 1 - $13; sxy += x * y; sxx += x * x }
        END { printf "L = %.3f", (sxx ? sxy / sxx : 0) }' "$WORK/rel.txt"
    echo "; this one means something only when the load average before each batch is below"
    echo "the core count: on a busy machine more processes win a larger share of the CPUs from"
    echo "the others, and throughput rises with k (a negative L)."
} >"$OUT"
cp "$WORK/rel.txt" "${OUT%.md}.data"
echo "wrote $OUT" >&2
