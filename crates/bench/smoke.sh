#!/usr/bin/env bash
# CI smoke of the benchmark: a short run in debug that must finish with exit 0.
# Not a timed assertion. Needs RabbitMQ on 127.0.0.1:5672 and PostgreSQL on
# 127.0.0.1:5432 (as the test suite does).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p mail-dispatch -p mail-dispatch-bench
target/debug/bench --jobs 200 --orgs 6 --concurrency 16 --output json > target/bench-smoke.json
echo "bench smoke: ok ($(grep -c '' target/bench-smoke.json) lines of JSON in target/bench-smoke.json)"
