#!/usr/bin/env bash
# Installs the real parts the tests and the demo use, from Debian's packages, when they
# are missing: etcd, HAProxy, the Docker engine and compose, wrk/hey, mmdebstrap, chromium
# (the dashboard test), promtool (the alert rules test), curl (the demo's readiness wait),
# pebble + pebble-challtestsrv (the ACME test CA, tests/test_acme.py), git and
# docker-registry (git push deploys), openssh-server and -client (the deploy test's push
# over ssh).
#
#   scripts/setup-host.sh        everything (`make test`)
#   scripts/setup-host.sh demo   only what `make demo` calls: the Docker engine, compose,
#                                curl (its readiness wait), mmdebstrap (the base image),
#                                git and docker-registry (its git push deploy)
set -euo pipefail

need=()
want() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
want dockerd docker.io
want docker-compose docker-compose
want curl curl
want mmdebstrap mmdebstrap
want git git
want docker-registry docker-registry
if [ "${1:-}" != demo ]; then
  want etcd etcd-server
  want etcdctl etcd-client
  want haproxy haproxy
  want wrk wrk
  want hey hey
  want openssl openssl
  want systemd-analyze systemd
  want chromium chromium
  want promtool prometheus
  want pebble pebble
  want ip iproute2
  want sshd openssh-server
  want ssh openssh-client
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing: ${need[*]}; install them (Debian: apt-get install ${need[*]}) or run as root" >&2
  exit 1
fi
echo "installing from Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
