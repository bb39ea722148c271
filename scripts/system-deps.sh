#!/usr/bin/env bash
# Install what the real-process tests and benches drive (Debian packages): nginx, Chromium,
# wrk (HTTP load), redis-server (the Celery peer's broker), rabbitmq-server (consumer tests) and
# postgresql (the cluster store's tests start a private server from its binaries).
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
# The tests run initdb/pg_ctl from Debian's versioned directory, not from PATH.
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "system-deps: need ${need[*]} but not root and no sudo; those tests will be skipped" >&2
        exit 0
    fi
fi
echo "system-deps: installing ${need[*]} with apt-get" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
