# The one image of the dev stack (docker-compose.yml): worker, beat, migrate,
# flower and api all run it with a different command.
#
#   docker build -t leaseflow:dev .
#   docker run --rm -e LEASEFLOW_DATABASE_URL=... -e LEASEFLOW_BROKER_URL=... leaseflow:dev
FROM python:3.11-slim

# PYTHONPATH: your workflow modules (e.g. LEASEFLOW_WORKFLOWS=examples.my_flows) import
# from the repository root, /app, whatever the working directory of a command.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/app

# An unprivileged user with a home: beat keeps its schedule in ~/.cache/leaseflow.
RUN groupadd --system --gid 10001 leaseflow \
    && useradd --system --uid 10001 --gid leaseflow --create-home --home-dir /home/leaseflow \
        --shell /usr/sbin/nologin leaseflow

WORKDIR /app

# The package (README.md is its long description) and Flower, installed as root and
# owned by root: the code is read-only to the user that runs it.
COPY pyproject.toml README.md ./
COPY leaseflow/ ./leaseflow/
RUN pip install --no-cache-dir '.[flower]' \
    && rm -rf build ./*.egg-info

COPY examples/ ./examples/

USER leaseflow

CMD ["leaseflow", "worker"]
