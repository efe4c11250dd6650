#!/usr/bin/env bash
# RabbitMQ users and permissions per role, least privilege (rabbitmqctl):
#
#   deploy/rabbitmq/permissions.sh VHOST [NAME_PREFIX]
#
# with the passwords in MAIL_DISPATCH_PRODUCER_PASSWORD, MAIL_DISPATCH_WORKER_PASSWORD
# and MAIL_DISPATCH_RESULTS_PASSWORD. NAME_PREFIX is MAIL_DISPATCH_QUEUE_PREFIX (empty
# by default). Users are created if missing (their password is set either way).
#
#   role        user                      may
#   producer    mail-dispatch-producer    publish to the jobs exchange; nothing else
#                                         (no result, no dead letter, no queue read)
#   worker      mail-dispatch-worker      declare, publish to and read its own
#                                         objects (<prefix>mail.*), and publish through
#                                         the default exchange (delay queues)
#   results     mail-dispatch-results     declare and read its own queues
#                                         (<prefix>results.*) bound to the results
#                                         exchange; no job queue, no publish
#
# Regular expressions of `set_permissions` are configure, write, read
# (rabbitmq.com/docs/access-control). Binding a queue needs write on the queue and
# read on the exchange; publishing needs write on the exchange.
set -euo pipefail
vhost="${1:?usage: permissions.sh VHOST [NAME_PREFIX]}"
prefix="${2:-}"
users_prefix="${MAIL_DISPATCH_RABBITMQ_USER_PREFIX:-}"
p="$(printf '%s' "$prefix" | sed 's/[.[\*^$()+?{|]/\\&/g')"

user() { # name password
  if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx "$1"; then
    rabbitmqctl -q change_password "$1" "$2"
  else
    rabbitmqctl -q add_user "$1" "$2"
  fi
}

producer="${users_prefix}mail-dispatch-producer"
worker="${users_prefix}mail-dispatch-worker"
results="${users_prefix}mail-dispatch-results"
user "$producer" "${MAIL_DISPATCH_PRODUCER_PASSWORD:?}"
user "$worker" "${MAIL_DISPATCH_WORKER_PASSWORD:?}"
user "$results" "${MAIL_DISPATCH_RESULTS_PASSWORD:?}"

rabbitmqctl -q set_permissions -p "$vhost" "$producer" '^$' "^${p}mail\\.jobs\$" '^$'
rabbitmqctl -q set_permissions -p "$vhost" "$worker" \
  "^${p}mail\\..*" "^(${p}mail\\..*|amq\\.default)\$" "^${p}mail\\..*"
rabbitmqctl -q set_permissions -p "$vhost" "$results" \
  "^${p}results\\..*" "^${p}results\\..*" "^(${p}mail\\.results|${p}results\\..*)\$"
echo "permissions set on vhost $vhost for $producer, $worker, $results"
