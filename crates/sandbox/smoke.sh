#!/usr/bin/env bash
# CI smoke of the sandbox and the demo (the README's main command): the demo must
# connect both organizations, send its notifications and exit 0; the sandbox's
# controls and pages must answer. Needs RabbitMQ and PostgreSQL as the tests do.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p mail-dispatch-sandbox
bin=target/debug/mail-dispatch-sandbox

out="$(mktemp)"
(cd "$(mktemp -d)" && "$OLDPWD/$bin" demo --sandbox-listen 127.0.0.1:18090 \
    --admin-listen 127.0.0.1:18080 --metrics-listen 127.0.0.1:19090) >"$out" 2>/dev/null
grep -q "acme     save and test .* test sent, integration active" "$out"
grep -q "globex   save and test .* test sent, integration active" "$out"
test "$(grep -cE '^(acme|globex|initech) +[a-z_]+ +(microsoft|google|default) +sent' "$out")" -eq 8
grep -qE '^  http://127\.0\.0\.1:18080/portal/start\?token=' "$out"
echo "sandbox smoke: demo ok"

"$bin" serve --listen 127.0.0.1:18091 >/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf http://127.0.0.1:18091/_sandbox/messages >/dev/null && break; sleep 0.1; done
curl -sf -X POST -d '{"latency_ms": 10, "throttle_next": 1, "retry_after_secs": 2, "fail_next": 1}' http://127.0.0.1:18091/_sandbox/faults | grep -q '"ok":true'
curl -sf -X POST -d '{"mailbox_limits": {"admin@example.com": 5}}' http://127.0.0.1:18091/_sandbox/faults | grep -q '"ok":true'
curl -sf -X POST -d '{"mailbox_limits": {"admin@example.com": null}}' http://127.0.0.1:18091/_sandbox/faults | grep -q '"ok":true'
curl -sf -X POST -d '{"provider": "google", "account": "a@b.example"}' http://127.0.0.1:18091/_sandbox/consent | grep -q '"ok":true'
curl -sf -X POST -d '{"account": "a@b.example"}' http://127.0.0.1:18091/_sandbox/revoke | grep -q '"ok":true'
curl -sf http://127.0.0.1:18091/_sandbox/ | grep -q "mail-dispatch sandbox"
# The consent page redirects back with a code, as Google's does.
loc="$(curl -s -o /dev/null -w '%{redirect_url}' "http://127.0.0.1:18091/o/oauth2/v2/auth?response_type=code&client_id=c&redirect_uri=http://127.0.0.1:1/cb&state=s&code_challenge=abcdefghijklmnopqrstuvwxyzabcdefghijklmnopq&code_challenge_method=S256&scope=openid&access_type=offline&prompt=consent")"
case "$loc" in http://127.0.0.1:1/cb\?code=*state=s*) ;; *) echo "unexpected consent redirect: $loc"; exit 1 ;; esac
echo "sandbox smoke: controls ok"
