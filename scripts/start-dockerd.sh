#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine: if `docker info` already works, does
# nothing; otherwise (as root) starts the distribution's dockerd in the background and
# waits for it with a deadline. Idempotent, so the demo, the tests and CI can all call it.
#
#   DOCKERD_TIMEOUT  seconds to wait for the engine (default 60)
#   DOCKERD_LOG      where dockerd's output goes (default /var/log/fluster-dockerd.log)
set -euo pipefail

# The Debian client; a newer one in /usr/local/bin may insist on buildx plugins.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker || true)}
timeout=${DOCKERD_TIMEOUT:-60}
log=${DOCKERD_LOG:-/var/log/fluster-dockerd.log}

if [ -z "$DOCKER" ]; then
  echo "start-dockerd: no docker client; install docker.io (scripts/setup-host.sh)" >&2
  exit 1
fi
if "$DOCKER" info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "start-dockerd: the Docker engine does not answer and this is not root;" \
    "start it (systemctl start docker) or add yourself to the docker group" >&2
  exit 1
fi
# With systemd as init, let it own the engine; otherwise run dockerd ourselves.
if [ -d /run/systemd/system ] && systemctl start docker 2>/dev/null; then
  :
elif ! pgrep -x dockerd >/dev/null; then
  dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
  echo "start-dockerd: starting $dockerd (log: $log)"
  # setsid: the engine must outlive the shell (and the test session) that started it.
  setsid "$dockerd" >>"$log" 2>&1 </dev/null &
fi

deadline=$((SECONDS + timeout))
until "$DOCKER" info >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "start-dockerd: no answer from the Docker engine after ${timeout}s; see $log" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "start-dockerd: Docker engine is up"
