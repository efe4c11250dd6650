#!/usr/bin/env bash
# Every run behind BENCHMARKS.md's `e75b253` section, one after another, each
# started once the machine is idle (below 15 % busy for 3 s). Outputs go to
# OUT/<name>.txt (stdout) and OUT/<name>.err (progress).
#
#   cargo build --release -p mail-dispatch -p mail-dispatch-bench
#   crates/bench/run-all.sh [OUT]            # default OUT: target/bench-runs
#
# OLD_WORKER=/path/to/an/older/mail-dispatch also measures that binary
# (zero latency and fairness at 2000 jobs/s), interleaved with the current one.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/bench-runs}
BENCH=${BENCH:-target/release/bench}
WORKER=${WORKER:-target/release/mail-dispatch}
mkdir -p "$OUT"

idle() {
  local u n s i rest t1 i1 t2 i2 busy
  for _ in $(seq 1 30); do
    read -r _ u n s i rest < /proc/stat; t1=$((u + n + s + i)); i1=$i; sleep 3
    read -r _ u n s i rest < /proc/stat; t2=$((u + n + s + i)); i2=$i
    busy=$((100 - 100 * (i2 - i1) / (t2 - t1)))
    [ "$busy" -lt 15 ] && return 0
  done
  echo "machine still busy (${busy} %); running anyway" >&2
}

run() {
  local name=$1; shift
  idle
  echo "== $name: $* ($(date +%T))" > "$OUT/$name.txt"
  "$BENCH" "$@" >> "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "rc=$?" >> "$OUT/$name.txt"
  echo "$name done: $(grep -E 'worker / bare|p99 < 2000|throughput \(' "$OUT/$name.txt" | tr -s ' ' | tr '\n' ' ')"
}

for r in 1 2 3; do
  run "zero-$r" --jobs 20000 --orgs 30 --concurrency 64 --worker-bin "$WORKER"
  [ -n "${OLD_WORKER:-}" ] && run "zero-old-$r" --jobs 20000 --orgs 30 --concurrency 64 --worker-bin "$OLD_WORKER"
done
for rate in 2000 2000 3000 4000 0; do
  run "fairness-$rate-$RANDOM" --scenario fairness --jobs 20000 --latency-ms 50 --flood-rate "$rate" --worker-bin "$WORKER"
done
[ -n "${OLD_WORKER:-}" ] && run fairness-2000-old --scenario fairness --jobs 20000 --latency-ms 50 --worker-bin "$OLD_WORKER"
for r in 1 2; do
  run "latency250-c64-$r" --jobs 3000 --concurrency 64 --latency-ms 250 --worker-bin "$WORKER"
  run "latency250-c256-$r" --jobs 6000 --concurrency 256 --latency-ms 250 --worker-bin "$WORKER"
done
run rss-1000-in-flight --jobs 3000 --concurrency 1000 --latency-ms 1000 --worker-bin "$WORKER"
for m in 10 1000 100000; do
  run "steady-$m-orgs" --jobs 20000 --orgs "$m" --concurrency 64 --warmup --no-bare --worker-bin "$WORKER"
done
run window-128 --jobs 20000 --orgs 30 --concurrency 64 --window 128 --no-bare --worker-bin "$WORKER"
