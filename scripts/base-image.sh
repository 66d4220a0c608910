#!/usr/bin/env bash
# Makes `debian:bookworm-slim` available to `docker build` on a machine that may have no
# container registry. In order:
#   1. the image is already there (pulled earlier, or built by an earlier run): done;
#   2. a registry answers `docker pull debian:bookworm-slim`: use the real image, and the
#      Dockerfiles `apt-get install` what it lacks;
#   3. otherwise build a bookworm rootfs with mmdebstrap (or debootstrap) from the Debian
#      mirror this machine's apt already uses, with the packages the fluster images need
#      pre-installed, cache it as a tarball and `docker import` it under the same name.
#
# The mirror is read from the apt sources at run time and never written anywhere: the
# rootfs ships with an empty sources list (every package the Dockerfiles want is already
# inside, so their `command -v X || apt-get install X` steps are no-ops on it).
#
#   FLUSTER_CACHE      cache dir (default <repo>/.cache); the tarball lives in base/
#   FLUSTER_BASE_PULL  0 skips step 2 (no registry here; saves the pull's timeout)
#   FLUSTER_BASE_FORCE 1 re-imports even if the image exists (after changing PACKAGES)
#   BASE_IMAGE         the name to provide (default debian:bookworm-slim)
#   APT_ETC            where apt's sources are read (default /etc/apt)
#   FLUSTER_BOOTSTRAP  mmdebstrap | debootstrap (default: mmdebstrap when installed)
#
# `base-image.sh --print-sources` prints the sources.list the rootfs would be built from.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker || echo docker)}
image=${BASE_IMAGE:-debian:bookworm-slim}
cache=${FLUSTER_CACHE:-$repo/.cache}/base
suite=bookworm

# What the images need: python3-venv for the wheel installs, haproxy for the edge image,
# etcd-server/etcd-client for the compose etcd, curl for HEALTHCHECKs, tini as PID 1.
PACKAGES=(ca-certificates curl tini python3 python3-venv haproxy etcd-server etcd-client)

apt_etc=${APT_ETC:-/etc/apt}

log() { echo "base-image: $*" >&2; }

# The mirror URIs of the Debian suites apt uses here: deb822 *.sources first, then one-line
# *.list files. Prints "URI SUITE" lines for the main archive and the security archive.
mirrors() {
  python3 - "$suite" "$apt_etc" <<'PY'
import glob, re, sys

suite, etc = sys.argv[1], sys.argv[2]
# A host on another Debian release names other suites; its mirror still serves ours.
DEBIAN = {"oldoldstable", "oldstable", "stable", "testing", "unstable", "sid", "experimental",
          "buster", "bullseye", "bookworm", "trixie", "forky", "duke"}
found = {}  # (rank, "main" | "security") -> uri; rank 0: our suite, 1: another Debian one

def take(uri, suites, components):
    if "main" not in components:
        return
    for s in suites:
        base, _, pocket = s.replace("/updates", "-security").partition("-")
        if base not in DEBIAN or pocket not in ("", "updates", "security"):
            continue
        kind = "security" if pocket == "security" else "main"
        found.setdefault((0 if base == suite else 1, kind), uri)

for path in sorted(glob.glob(f"{etc}/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            take(uri, fields.get("suites", "").split(), fields.get("components", "").split())

for path in [f"{etc}/sources.list", *sorted(glob.glob(f"{etc}/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            take(line[1], [line[2]], line[3:])

def best(kind):
    return found.get((0, kind)) or found.get((1, kind))

if not best("main"):
    sys.exit(f"no Debian 'deb ... main' source in {etc}; cannot build a {suite} rootfs")
print(best("main"), suite)
print(best("main"), f"{suite}-updates")
if best("security"):
    print(best("security"), f"{suite}-security")
PY
}

sources_list() {
  mirrors | while read -r uri s; do
    echo "deb $uri $s main"
  done
}

if [ "${1:-}" = --print-sources ]; then
  sources_list
  exit 0
fi

if [ "${FLUSTER_BASE_FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$image" >/dev/null 2>&1; then
  log "$image is present"
  exit 0
fi
if [ "${FLUSTER_BASE_PULL:-1}" != 0 ] && [ "${FLUSTER_BASE_FORCE:-0}" != 1 ] &&
  timeout "${FLUSTER_PULL_TIMEOUT:-60}" "$DOCKER" pull -q "$image" >/dev/null 2>&1; then
  log "pulled $image from a registry"
  exit 0
fi

key=$(printf '%s\n' "$suite" "${PACKAGES[@]}" | sha256sum | cut -c1-12)
tarball=$cache/debian-$suite-$key.tar
if [ ! -s "$tarball" ]; then
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  sources_list >"$work/sources.list"
  start=$SECONDS
  # Trim like the real -slim image: no docs, man pages or locales.
  slim=(
    --dpkgopt=path-exclude=/usr/share/doc/*
    --dpkgopt=path-include=/usr/share/doc/*/copyright
    --dpkgopt=path-exclude=/usr/share/man/*
    --dpkgopt=path-exclude=/usr/share/info/*
    --dpkgopt=path-exclude=/usr/share/locale/*
    --dpkgopt=path-include=/usr/share/locale/locale.alias
  )
  tool=${FLUSTER_BOOTSTRAP:-$(command -v mmdebstrap >/dev/null && echo mmdebstrap || echo debootstrap)}
  if [ "$tool" = mmdebstrap ]; then
    log "building a $suite rootfs with mmdebstrap (${#PACKAGES[@]} extra packages)"
    # The customize hooks leave no trace of the mirror and no apt caches in the image
    # ("$1" is the rootfs, expanded by mmdebstrap's shell, hence the single quotes).
    # shellcheck disable=SC2016
    mmdebstrap --quiet --variant=apt --format=tar "${slim[@]}" \
      --include="$(IFS=,; echo "${PACKAGES[*]}")" \
      --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
      "$suite" "$work/rootfs.tar" "$work/sources.list"
  elif [ "$tool" = debootstrap ] && command -v debootstrap >/dev/null; then
    [ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 1; }
    # debootstrap takes one mirror: the main archive, without -updates and -security.
    uri=$(head -n1 "$work/sources.list" | cut -d' ' -f2)
    log "building a $suite rootfs with debootstrap"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
      "$suite" "$work/rootfs" "$uri" >"$work/debootstrap.log" ||
      { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs"/etc/apt/sources.list "$work/rootfs"/etc/apt/sources.list.d/* \
      "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/var/cache/apt/archives/*.deb \
      "$work/rootfs"/usr/share/doc "$work/rootfs"/usr/share/man
    tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
  else
    log "neither mmdebstrap nor debootstrap is installed (scripts/setup-host.sh installs mmdebstrap)"
    exit 1
  fi
  mv "$work/rootfs.tar" "$tarball"
  log "rootfs built in $((SECONDS - start))s: $tarball ($(du -h "$tarball" | cut -f1))"
fi

log "importing $tarball as $image"
"$DOCKER" import \
  --change 'CMD ["bash"]' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.fluster.base=local-rootfs' \
  "$tarball" "$image" >/dev/null
log "$image ready"
