#!/bin/sh
# Make sure the PostgreSQL, RabbitMQ and Prometheus server binaries exist (Prometheus
# with promtool: the rule and dashboard tests). The tests and the demo start their own
# throwaway instances from these binaries; no running service is needed or touched.
set -e
missing=""
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing="$missing postgresql"
fi
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    missing="$missing rabbitmq-server"
fi
if [ ! -x /usr/bin/prometheus ] || [ ! -x /usr/bin/promtool ]; then
    missing="$missing prometheus"
fi
[ -z "$missing" ] && exit 0
echo "installing:$missing"
if [ "$(id -u)" != 0 ]; then
    echo "need root to install$missing (or install them yourself: apt-get install$missing)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
# The packages start system services we do not need; ours run privately.
command -v service >/dev/null 2>&1 && service rabbitmq-server stop >/dev/null 2>&1 || true
command -v service >/dev/null 2>&1 && service prometheus stop >/dev/null 2>&1 || true
