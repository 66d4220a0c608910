#!/usr/bin/env bash
# Builds the wheels and the Docker images of the local cluster:
#   fluster/haproxy   HAProxy + reloader (the edge)      haproxy/Dockerfile, target haproxy
#   fluster/sidekick  the host agent                      haproxy/Dockerfile, target sidekick
#   fluster/etcd      Debian's etcd-server                docker/etcd/
#   fluster/demo-app  the demo service                    examples/demo-app/
#   fluster/registry  Debian's docker-registry            docker/registry/
# all FROM debian:bookworm-slim (scripts/base-image.sh provides it where no registry does).
#
# Python code reaches the images only as wheels built here on the host, installed with
# `pip install --no-index`: containers need no package index. The host's Python must match
# bookworm's (3.11) for the compiled wheels; with any other host Python, pip downloads the
# cp311 manylinux wheels for the image instead.
#
# `build-images.sh prune` only removes the images earlier builds replaced, once no
# container uses them (scripts/demo.sh runs it after compose moved to the new ones).
#
#   FLUSTER_TAG    image tag (default dev)
#   FLUSTER_CACHE  where wheels are kept (default <repo>/.cache); .cache/wheels/ is the
#                  only part of the repo the Docker build context sends (.dockerignore)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cd "$repo"
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
tag=${FLUSTER_TAG:-dev}
wheels=$repo/.cache/wheels
log() { echo "build-images: $*" >&2; }

# One build at a time per checkout: two test runs or a test and `make demo` would otherwise
# replace .cache/wheels under each other's docker build.
mkdir -p "$repo/.cache"
exec 9>"$repo/.cache/build-images.lock"
if ! flock -n 9; then
  log "waiting for another build in this checkout"
  flock 9
fi

# Images a rebuild replaced: removed once no container uses them any more (right after
# the build, or by `build-images.sh prune` after compose moved the containers over), so
# rebuilding after each change does not pile up untagged images.
stale=$repo/.cache/stale-images
prune_stale() {
  [ -s "$stale" ] || return 0
  local id tags keep=()
  while read -r id; do
    # Only untagged ones: a revert can make an old id current again.
    tags=$("$DOCKER" image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null) || continue
    if [ "$tags" != 0 ] || ! "$DOCKER" image rm "$id" >/dev/null 2>&1; then
      [ "$tags" != 0 ] || keep+=("$id") # a container still uses it: next time
    fi
  done <"$stale"
  printf '%s\n' "${keep[@]}" | grep . >"$stale.new" || true
  mv "$stale.new" "$stale"
}
if [ "${1:-}" = prune ]; then
  prune_stale
  exit 0
fi

pip=(python3 -m pip)
[ -x .venv/bin/pip ] && pip=(.venv/bin/python -m pip)
# pip's "Location ... is ignored" warnings about find-links dirs a machine's pip config
# names but lacks are noise here.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pyver=$("${pip[0]}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

build_wheels() {
  local stage start=$SECONDS
  # Build from a copy of the sources: setuptools' in-tree build/ directory can carry stale
  # modules into a wheel.
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  # -L: reloader/templates is a link to haproxy/templates; the wheel needs the files.
  # The whole project: `fluster` lists the deployer's commands (deployer/options.py).
  cp -R -L pyproject.toml fluster sidekick reloader deployer "$stage/"
  [ -f README.md ] && cp README.md "$stage/"
  find "$stage" -name __pycache__ -prune -exec rm -rf {} +
  rm -rf "$wheels.new"
  mkdir -p "$wheels.new/fluster" "$wheels.new/deps"
  # A fixed timestamp makes the wheel a function of the sources only: unchanged sources
  # give a byte-identical wheel, Docker's COPY hits its cache, the image keeps its id, and
  # `docker-compose up` on a running demo leaves its containers alone.
  SOURCE_DATE_EPOCH=315532800 \
    quiet_pip wheel -q --disable-pip-version-check --no-deps -w "$wheels.new/fluster" "$stage"
  local app
  app=$(ls "$wheels.new"/fluster/*.whl)
  if [ "$pyver" = 3.11 ]; then
    quiet_pip wheel -q --disable-pip-version-check -w "$wheels.new/deps" "$app"
  else
    log "host Python is $pyver; downloading cp311 wheels for the images"
    local arch
    arch=$(uname -m)
    quiet_pip download -q --disable-pip-version-check --only-binary=:all: \
      --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
      --platform "manylinux_2_28_$arch" --platform "manylinux2014_$arch" \
      --platform "manylinux2010_$arch" --platform "manylinux1_$arch" --platform any \
      -d "$wheels.new/deps" "$app"
  fi
  rm -f "$wheels.new"/deps/fluster-*.whl
  rm -rf "$wheels"
  mv "$wheels.new" "$wheels"
  log "wheels built in $((SECONDS - start))s: $(find "$wheels/deps" -name '*.whl' | wc -l) dependencies + $(basename "$app")"
}

if ! build_wheels; then
  # No package index reachable: the wheels of an earlier run still make working images.
  if ls "$wheels"/fluster/*.whl >/dev/null 2>&1; then
    log "could not build wheels; reusing the ones in $wheels"
  else
    log "could not build wheels and none are cached"
    exit 1
  fi
fi

"$here/base-image.sh"

build() {
  local name=$1
  shift
  local start=$SECONDS old new
  old=$("$DOCKER" image inspect -f '{{.Id}}' "fluster/$name:$tag" 2>/dev/null || true)
  # Host network for RUN steps: apt-get (real base image only) needs no bridge, and a build
  # still works when the default bridge is unavailable.
  "$DOCKER" build -q --network host -t "fluster/$name:$tag" "$@" >/dev/null
  new=$("$DOCKER" image inspect -f '{{.Id}}' "fluster/$name:$tag")
  if [ "$old" = "$new" ]; then
    log "fluster/$name:$tag unchanged ($((SECONDS - start))s)"
  else
    [ -z "$old" ] || echo "$old" >>"$stale"
    log "fluster/$name:$tag built in $((SECONDS - start))s"
  fi
}
build etcd docker/etcd
# The registry's context: docker/registry, plus the host's docker-registry when it has one
# (no package mirror needed in the build then).
registry_ctx=$(mktemp -d)
trap 'rm -rf "$registry_ctx"' EXIT
cp docker/registry/* "$registry_ctx/"
mkdir -p "$registry_ctx/bin"
if [ -x /usr/bin/docker-registry ]; then cp /usr/bin/docker-registry "$registry_ctx/bin/"; fi
build registry "$registry_ctx"
build demo-app examples/demo-app
build sidekick -f haproxy/Dockerfile --target sidekick .
build haproxy -f haproxy/Dockerfile --target haproxy .
prune_stale
