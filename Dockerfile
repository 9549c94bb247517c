FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cdc_relay ./cdc_relay
COPY sql ./sql
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["cdc-relay"]
CMD ["run"]
