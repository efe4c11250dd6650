#!/usr/bin/env bash
# CI smoke of the benchmark: short runs in debug that must finish with exit 0 —
# the throughput scenario and the fairness scenario. Not a timed assertion (the
# fairness run's target verdict is printed, not checked). Needs RabbitMQ on
# 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 (as the test suite does).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p mail-dispatch -p mail-dispatch-bench
target/debug/bench --jobs 200 --orgs 6 --concurrency 16 --output json > target/bench-smoke.json
echo "bench smoke: ok ($(grep -c '' target/bench-smoke.json) lines of JSON in target/bench-smoke.json)"
target/debug/bench --scenario fairness --jobs 300 --flood-rate 300 --quiet-jobs 20 \
  --quiet-rate 20 --concurrency 16 --output json > target/bench-smoke-fairness.json
grep -q '"scenario": "fairness"' target/bench-smoke-fairness.json
echo "bench fairness smoke: ok (target/bench-smoke-fairness.json)"
