# cairn's container image: the registry, its CLI and the consumers.
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY engine ./engine
COPY migrations ./migrations
COPY consumers ./consumers
RUN pip install --no-cache-dir . && rm -rf /src

RUN useradd --system --home-dir /data cairn && mkdir -p /data && chown cairn /data
USER cairn
WORKDIR /data
VOLUME /data
EXPOSE 5000

ENTRYPOINT ["cairn"]
CMD ["serve", "--listen", "0.0.0.0:5000", "--data-dir", "/data"]
