# syntax=docker/dockerfile:1
# node-registry sidecar. Build: docker build -t node-registry .
# Run:   docker run --init -p 50051:50051 node-registry            (embedded Redis)
#        docker run --init -e REGISTRY_REDIS_URL=redis://redis:6379/0 node-registry
# --init (tini) reaps any stray process; the sidecar itself handles SIGTERM gracefully.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
# Client first: the sidecar depends on registry-client, which is not on PyPI, so both
# wheels are built in one pip run and installed from that wheel set alone (--no-index).
COPY clients/python clients/python
COPY pyproject.toml ./
COPY registry registry
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels ./clients/python . \
    && /opt/venv/bin/pip install --no-index --find-links /wheels node-registry \
    && /opt/venv/bin/python -c "import registry, registry_client.v1.registry_pb2"

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
# redis-server serves the embedded mode (no REGISTRY_REDIS_URL); it is never exposed:
# it listens only on a Unix socket inside the data directory.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 registry \
    && useradd --system --uid 10001 --gid registry --home-dir /var/lib/registry \
        --shell /usr/sbin/nologin registry \
    && install -d -o registry -g registry -m 0700 /var/lib/registry /var/lib/registry/data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REGISTRY_LISTEN=0.0.0.0:50051 \
    REGISTRY_DATA_DIR=/var/lib/registry/data
USER registry:registry
WORKDIR /var/lib/registry
VOLUME ["/var/lib/registry/data"]
EXPOSE 50051
# Exits 0 only when grpc.health.v1 reports SERVING (NOT_SERVING while draining on SIGTERM).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "registry", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["registry", "serve"]
