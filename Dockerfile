# vmpool server image. Build: docker build -t ghcr.io/vmpool/vmpool:0.1.0 .
# The chart always gives the server an external PostgreSQL (VMPOOL_DATABASE_URL);
# the image is never meant to run the embedded demo database.

# --- build: a wheel of vmpool and of every dependency ------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
RUN pip wheel --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 vmpool \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vmpool
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels vmpool \
 && vmpool --help >/dev/null

LABEL org.opencontainers.image.title="vmpool" \
      org.opencontainers.image.description="Pools of pre-warmed KubeVirt VMs leased over gRPC" \
      org.opencontainers.image.source="https://github.com/vmpool/vmpool" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["vmpool"]
CMD ["--help"]
