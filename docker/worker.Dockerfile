# The batch worker: a Prefect worker that runs the scoring (and training) flows.
# Core install + the `pools` extra: Triton client, Prefect, Dask; no torch, no server.
# The same image runs the Prefect server in compose.yaml (Prefect's pins are the lock's).
#
#   DOCKER_BUILDKIT=0 docker build -f docker/worker.Dockerfile -t cellpipe-worker .
#   ... --build-arg BASE_IMAGE=cellpipe-base:bookworm   (the local Debian base)
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# The requirement list alone, so that the dependency layer below is only rebuilt when the
# dependencies change (not when another part of pyproject.toml does).
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml docker/scripts/requirements.py /tmp/
RUN python3 /tmp/requirements.py /tmp/pyproject.toml pools > /tmp/requirements.txt

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_UI_ENABLED=false \
    PREFECT_HOME=/home/cellpipe/.prefect

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin cellpipe \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir setuptools==80.9.0

# Dependencies first: pinned by the lock, rebuilt only when they change.
COPY requirements.lock /tmp/build/
COPY --from=requirements /tmp/requirements.txt /tmp/build/
RUN pip install --no-cache-dir -c /tmp/build/requirements.lock -r /tmp/build/requirements.txt

# The source last: cellpipe itself (no dependencies), the flows and the params they read.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build src /tmp/build
COPY flows ./flows
COPY params.yaml ./
COPY docker/scripts/deploy_scoring.py /usr/local/lib/cellpipe/

# Inbox and results are volumes in the compose stack; the worker's user owns them.
RUN mkdir -p /data/inbox /results \
    && chown cellpipe:cellpipe /data/inbox /results
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["prefect", "worker", "start", "--pool", "cellpipe", "--type", "process", "--with-healthcheck"]
