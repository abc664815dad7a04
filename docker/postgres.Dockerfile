# PostgreSQL for the Prefect server, built from Debian's packages: the local stand-in for
# the official postgres image where no registry image can be pulled (compose.local.yaml).
# Configured like the official image: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, and
# the data in /var/lib/postgresql/data (a volume).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The official image's uid/gid (999), so a data volume moves between the two.
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql-15=15.* \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY docker/scripts/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

USER 999:999
EXPOSE 5432
VOLUME ["/var/lib/postgresql/data"]
HEALTHCHECK --interval=5s --timeout=4s --retries=10 \
    CMD ["pg_isready", "-h", "127.0.0.1", "-p", "5432"]
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
