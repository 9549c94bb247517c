# cdc-relay: the relay alone (no dev tooling, no tests), pinned dependencies, non-root.
#   docker build -t cdc-relay .
#   docker run --rm -e CDC_RELAY_DSN_FILE=/run/secrets/dsn -e CDC_RELAY_AMQP_URL_FILE=... cdc-relay
# See docs/operations.md ("The container image").
# Build stage: the wheel, with the hot path compiled by Cython (docs/accelerator.md); the
# C compiler stays here. The runtime stage checks that the compiled modules are what runs.
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Only the package and what building it needs (.dockerignore keeps the rest out).
WORKDIR /build
COPY pyproject.toml setup.py README.md ./
COPY deploy/constraints.txt ./deploy/constraints.txt
COPY cdc_relay ./cdc_relay
RUN pip wheel --no-deps --constraint deploy/constraints.txt --wheel-dir /wheels . \
    && cp deploy/constraints.txt /wheels/

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /tmp/wheels
RUN pip install --constraint /tmp/wheels/constraints.txt /tmp/wheels/cdc_relay-*.whl \
    && rm -rf /tmp/wheels \
    && python -c "from cdc_relay.accel import choice; c = choice(); assert c.implementation == 'compiled', c.reason" \
    && groupadd --system --gid 10001 cdcrelay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cdcrelay

# The metrics server must listen for the health check (and for Prometheus to scrape it).
ENV CDC_RELAY_METRICS_PORT=9187 \
    CDC_RELAY_METRICS_HOST=0.0.0.0 \
    CDC_RELAY_LOG_FORMAT=json
EXPOSE 9187

USER 10001:10001
WORKDIR /

# /healthz: the process is alive (use /readyz to know it is streaming). No curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CDC_RELAY_METRICS_PORT', '9187'), timeout=4)"]

ENTRYPOINT ["cdc-relay"]
CMD ["run"]
