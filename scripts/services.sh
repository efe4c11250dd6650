# Sourced by scripts/test and .ci/run: RabbitMQ and PostgreSQL on their default
# local ports, installed from Debian's packages and started when they are not;
# and headless Chromium with its WebDriver (the portal's browser tests).

log() { printf '==> %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_package() { # command package
  if ! command -v "$1" >/dev/null 2>&1; then
    log "installing $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"
  fi
}

ensure_services() {
  ensure_package rabbitmq-server rabbitmq-server
  ensure_package pg_ctlcluster postgresql
  if ! port_open 5432; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  if ! port_open 5672; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
  fi
  for _ in $(seq 1 60); do
    if port_open 5432 && port_open 5672; then break; fi
    sleep 1
  done
  port_open 5432 || { echo "PostgreSQL did not start"; return 1; }
  port_open 5672 || { echo "RabbitMQ did not start"; return 1; }
  rabbitmqctl await_startup >/dev/null 2>&1 || true
}

# The portal's browser tests (tests/e2e/portal.rs) drive Debian's Chromium
# through chromedriver (package chromium-driver, which depends on chromium).
ensure_browser() {
  ensure_package chromium chromium
  ensure_package chromedriver chromium-driver
}
