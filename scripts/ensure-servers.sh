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
# The packages just installed start system services we do not need (ours run
# privately); a service that was there before is the machine's, and is left alone.
for package in $missing; do
    case "$package" in
        rabbitmq-server | prometheus)
            command -v service >/dev/null 2>&1 && service "$package" stop >/dev/null 2>&1 || true
            ;;
    esac
done
