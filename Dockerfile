# The fluster images, one Dockerfile with a target per role:
#   docker build --target haproxy  -t fluster/haproxy  .   # HAProxy + reloader (the edge)
#   docker build --target sidekick -t fluster/sidekick .   # the host agent
# (scripts/build-images.sh first builds the wheels this copies from .cache/wheels/.)
#
# Why two targets rather than one image with two entrypoints: each role gets its own
# ENTRYPOINT and HEALTHCHECK, so `docker run fluster/sidekick` and a fleet unit need no
# extra flags, and the sidekick image does not carry HAProxy. Both share every layer up to
# `runtime` (base, Python, the virtualenv), so the second image costs a few kilobytes of
# disk and of transfer, and `fluster` (the operator CLI) is in both.
#
# FROM debian:bookworm-slim: the real image where a registry answers (packages are then
# installed below), or the stand-in scripts/base-image.sh imports, which already has them
# (the `command -v` tests make those steps no-ops).

FROM debian:bookworm-slim AS venv
RUN set -eux; \
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; \
      rm -rf /var/lib/apt/lists/*; \
    fi
# Dependencies first, in their own stage: a change to fluster's code does not reinstall them.
COPY .cache/wheels/deps /wheels/deps
RUN python3 -m venv /opt/fluster \
 && /opt/fluster/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
      /wheels/deps/*.whl

FROM debian:bookworm-slim AS runtime
RUN set -eux; \
    missing=""; \
    for p in python3:python3 tini:tini curl:curl; do \
      command -v "${p%%:*}" >/dev/null || missing="$missing ${p#*:}"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing ca-certificates; \
      rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=venv /opt/fluster /opt/fluster
COPY .cache/wheels/fluster /wheels/fluster
RUN /opt/fluster/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check \
      /wheels/fluster/*.whl \
 && rm -rf /wheels
ENV PATH=/opt/fluster/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ETCD_ENDPOINTS=etcd:2379

FROM runtime AS sidekick
# Root: the host agent talks to the Docker socket mounted from the host.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["sidekick", "--check"]
ENTRYPOINT ["tini", "--", "sidekick"]
CMD ["--all"]

FROM runtime AS haproxy
RUN set -eux; \
    if ! command -v haproxy >/dev/null; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    mkdir -p /var/lib/fluster
ENV RELOADER_STATE_DIR=/var/lib/fluster \
    RELOADER_HTTP_BIND=*:80 \
    RELOADER_STATUS_BIND=0.0.0.0:9090
EXPOSE 80 9090
HEALTHCHECK --interval=3s --timeout=2s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz >/dev/null || exit 1
# tini forwards SIGTERM to the reloader, which stops HAProxy gracefully and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "reloader"]
CMD ["run"]
