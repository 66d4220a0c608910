#!/usr/bin/env bash
# The local cluster in one command (the README's `make demo` / `make demo-down`):
#   scripts/demo.sh up     start Docker if needed, provide the base image (built from Debian
#                          packages when no registry answers), build wheels and images,
#                          bring up etcd, HAProxy+reloader, the sidekick and 3 demo
#                          instances, wait until they serve, print the URLs
#   scripts/demo.sh deploy a `git push` deploy of the demo app onto the running cluster:
#                          the app `web` (its repository in .cache/demo/), a commit of
#                          examples/demo-app pushed to it; the new version takes over
#                          web.localhost. Run it again for the next version.
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
  "${compose[@]}" up -d --no-build --scale "web=$scale" etcd haproxy sidekick registry web
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
Deploy the demo app with git push: make demo-deploy   (docs/DEPLOYING.md)
Or by hand (docs/DEPLOYING.md, "A deploy, by hand"):
     ${compose[*]} up -d --no-deps --scale web=5 web
     ${compose[*]} up -d --no-deps --scale web-v2=2 web-v2
     ${compose[*]} exec sidekick fluster promote web v2
Stop: make demo-down
MSG
}

# A git push deploy of examples/demo-app as the app `web`, through the cluster's registry
# and sidekick: fluster app create (config + bare repository + hook), then a commit pushed
# to that repository, whose hook runs `fluster deploy` and prints every stage.
deploy() {
  local fluster=$repo/.venv/bin/fluster work=$repo/.cache/demo/web repos=$repo/.cache/demo/repos
  [ -x "$fluster" ] || { echo "demo: run make demo first (it makes .venv)" >&2; exit 1; }
  local etcd registry
  etcd=$("${compose[@]}" port etcd 2379 2>/dev/null || true)
  registry=$("${compose[@]}" port registry 5000 2>/dev/null || true)
  if [ -z "$etcd" ] || [ -z "$registry" ]; then
    echo "demo: the cluster is not up (make demo)" >&2
    exit 1
  fi
  export ETCD_ENDPOINTS=$etcd FLUSTER_REGISTRY=$registry FLUSTER_REPOS=$repos
  # The sidekick registers containers by their IP on the project's `apps` network
  # (--internal), where the edge reaches them and etcd is not: deployed containers join it.
  export FLUSTER_NETWORK=${COMPOSE_PROJECT_NAME}_apps
  "$fluster" app create web --replicas 2 --port 8000 --check http:/health --ssh-host localhost
  mkdir -p "$work"
  cp examples/demo-app/Dockerfile examples/demo-app/app.py "$work/"
  date -u +"deployed by make demo-deploy at %FT%TZ" >"$work/DEPLOYED"
  git -C "$work" init -q -b main 2>/dev/null || true
  git -C "$work" remote remove production 2>/dev/null || true
  git -C "$work" remote add production "$repos/web.git"
  git -C "$work" add -A
  git -C "$work" -c user.name=demo -c user.email=demo@localhost commit -q -m "demo deploy $(date -u +%T)"
  echo "demo: git push production main (from $work)"
  git -C "$work" push production HEAD:main
  cat <<MSG

The new version serves web.localhost:
  curl -H 'Host: web.localhost' -H 'Accept: application/json' http://127.0.0.1:$http_port/
A day with it (docs/DEPLOYING.md, "A day with the app"), with ETCD_ENDPOINTS=$etcd:
  .venv/bin/fluster releases web                    (v1, v2, ...: each stage's time)
  .venv/bin/fluster logs web -f                     (every instance, interleaved)
  .venv/bin/fluster app config web --env GREETING=hi   (a config release, no failed request)
  .venv/bin/fluster scale web 3
  .venv/bin/fluster run web -- python3 -c 'import os; print(os.environ["APP_VERSION"])'
  .venv/bin/fluster rollback web --to v1            (any release, with its config)
Deploy the next version: make demo-deploy (or commit in $work and git push production main)
MSG
}

down() {
  if ! "${DOCKER:-/usr/bin/docker}" info >/dev/null 2>&1; then
    echo "demo: Docker is not running; nothing to stop"
    return 0
  fi
  # What make demo-deploy started on the project's network (compose does not own it).
  local deployed
  deployed=$("${DOCKER:-/usr/bin/docker}" ps -aq --filter label=fluster.app \
    --filter "network=${COMPOSE_PROJECT_NAME}_apps")
  if [ -n "$deployed" ]; then
    # shellcheck disable=SC2086
    "${DOCKER:-/usr/bin/docker}" rm -f $deployed >/dev/null
  fi
  "${compose[@]}" down --volumes --remove-orphans --timeout 30
}

case "${1:-}" in
  up) up ;;
  deploy) deploy ;;
  down) down ;;
  *)
    echo "usage: $0 up|deploy|down" >&2
    exit 2
    ;;
esac
