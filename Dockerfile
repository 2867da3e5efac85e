# syntax=docker/dockerfile:1
# node-registry sidecar. Build: docker build -t node-registry .
# Run:   docker run --init -p 50051:50051 node-registry            (embedded Redis)
#        docker run --init -e REGISTRY_REDIS_URL=redis://redis:6379/0 \
#            -e REGISTRY_METRICS_LISTEN=0.0.0.0:9464 -p 50051:50051 -p 9464:9464 node-registry
# --init (tini) reaps any stray process; the sidecar itself handles SIGTERM gracefully.
# Examples for Compose and Kubernetes, and what each setting means: deploy/README.md and
# docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade "pip>=25.1"
# Client first: the sidecar depends on registry-client, which is not on PyPI, so both
# wheels are built in one pip run and installed from that wheel set alone (--no-index).
# Everything else (grpcio, redis, numpy, opentelemetry-*, prometheus-client...) comes as
# wheels from the index, resolved against pyproject.toml.
COPY clients/python clients/python
COPY pyproject.toml ./
COPY registry registry
# pip compiles every module to bytecode as it installs (PYTHONDONTWRITEBYTECODE only
# stops the interpreter), so the image starts fast and never writes a .pyc at run time:
# a read-only root filesystem is fine. pip and setuptools leave the runtime venv.
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels ./clients/python . \
    && /opt/venv/bin/pip install --no-index --find-links /wheels node-registry \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import registry.server, registry.metrics, registry.tracing, registry_client.v1.registry_pb2" \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet setuptools pip

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="node-registry" \
      org.opencontainers.image.description="gRPC node-registry sidecar backed by Redis"
# redis-server serves the embedded mode (no REGISTRY_REDIS_URL); it is never exposed:
# it listens only on a Unix socket inside the data directory. Its version follows the
# base image's Debian release, hence unpinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 registry \
    && useradd --system --uid 10001 --gid registry --home-dir /var/lib/registry \
        --shell /usr/sbin/nologin registry \
    && install -d -o registry -g registry -m 0700 /var/lib/registry /var/lib/registry/data
COPY --from=builder /opt/venv /opt/venv
# Metrics stay off unless REGISTRY_METRICS_LISTEN is set (0.0.0.0:9464 by convention);
# OTLP export follows the standard OTEL_* variables (docs/operations.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REGISTRY_LISTEN=0.0.0.0:50051 \
    REGISTRY_DATA_DIR=/var/lib/registry/data
# Numeric, so Kubernetes' runAsNonRoot can verify it without resolving a name.
USER 10001:10001
WORKDIR /var/lib/registry
# The write-buffer journal lives here (and the embedded Redis, when no Redis URL is given).
VOLUME ["/var/lib/registry/data"]
# 50051: gRPC (registry.v1, grpc.health.v1, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# Exits 0 only when grpc.health.v1 reports SERVING (NOT_SERVING while preloading and while
# draining on SIGTERM). Without --target it dials REGISTRY_LISTEN, a wildcard host on
# loopback, so it follows a changed port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["registry", "health"]
ENTRYPOINT ["registry", "serve"]
