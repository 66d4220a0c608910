#!/usr/bin/env bash
# The local cluster in one command (the README's `make demo` / `make demo-down`):
#   scripts/demo.sh up     start Docker if needed, provide the base image (built from Debian
#                          packages when no registry answers), build wheels and images,
#                          bring up etcd, HAProxy+reloader, the sidekick and 3 demo
#                          instances, wait until they serve, print the URLs
#   scripts/demo.sh down   stop and remove it all (containers, network, volumes)
#
#   COMPOSE_PROJECT_NAME  (default fluster)   FLUSTER_HTTP_PORT (8080)
#   FLUSTER_STATUS_PORT   (9090)
#   DEMO_SCALE            instances of web (3)   DEMO_TIMEOUT  seconds to wait (120)
#   FLUSTER_COMPOSE       the compose command (default docker-compose, else docker compose)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cd "$repo"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-fluster}
http_port=${FLUSTER_HTTP_PORT:-8080}
status_port=${FLUSTER_STATUS_PORT:-9090}
scale=${DEMO_SCALE:-3}
timeout=${DEMO_TIMEOUT:-120}

# Debian's docker-compose 1.29, else the Compose v2 plugin; FLUSTER_COMPOSE="docker compose"
# chooses.
if [ -n "${FLUSTER_COMPOSE:-}" ]; then
  read -r -a compose <<<"$FLUSTER_COMPOSE"
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  echo "demo: neither docker-compose nor 'docker compose' is installed (scripts/setup-host.sh)" >&2
  exit 1
fi

# Answering instances of web, as seen through HAProxy: prints their distinct ids.
instances() {
  local _
  for _ in $(seq 1 $((scale * 6))); do
    curl -fsS --max-time 2 -H 'Host: web.localhost' -H 'Accept: application/json' \
      "http://127.0.0.1:$http_port/" 2>/dev/null |
      sed -n 's/.*"instance": "\([^"]*\)".*/\1/p'
  done | sort -u
}

up() {
  "$here/start-dockerd.sh"
  "$here/build-images.sh"
  echo "demo: starting project $COMPOSE_PROJECT_NAME with $scale instances of web"
  # The services by name: a bare `up` would also put web-v2 back to its scale of 0 and,
  # after a promotion to v2, take every v2 instance away. Containers whose image and
  # settings did not change are left running (the image builds are reproducible).
  "${compose[@]}" up -d --no-build --scale "web=$scale" etcd haproxy sidekick web
  "$here/build-images.sh" prune
  local deadline=$((SECONDS + timeout)) seen=0
  until seen=$(instances | wc -l) && [ "$seen" -ge "$scale" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "demo: only $seen of $scale instances answer after ${timeout}s; recent logs:" >&2
      "${compose[@]}" logs --tail=20 >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  local etcd
  etcd=$("${compose[@]}" port etcd 2379 2>/dev/null || true)
  cat <<MSG

fluster demo is up ($seen instances of web answering):
  app           http://web.localhost:$http_port/
                  curl -H 'Host: web.localhost' http://127.0.0.1:$http_port/
  status page   http://127.0.0.1:$status_port/   (JSON: /status, metrics: /metrics)
  etcd          ETCD_ENDPOINTS=$etcd .venv/bin/fluster ls
                  or: ${compose[*]} exec sidekick fluster ls
Try (docs/DEPLOYING.md, "A deploy, by hand"):
     ${compose[*]} up -d --no-deps --scale web=5 web
     ${compose[*]} up -d --no-deps --scale web-v2=2 web-v2
     ${compose[*]} exec sidekick fluster promote web v2
Stop: make demo-down
MSG
}

down() {
  if ! "${DOCKER:-/usr/bin/docker}" info >/dev/null 2>&1; then
    echo "demo: Docker is not running; nothing to stop"
    return 0
  fi
  "${compose[@]}" down --volumes --remove-orphans --timeout 30
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
