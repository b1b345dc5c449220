# syntax=docker/dockerfile:1
# The Fedplane agent image: fedplane-common and fedplane-agent only (no hub, no etcd API, no JWT library).
# Build from the repository root:  docker build -f deploy/docker/agent.Dockerfile -t fedplane-agent:0.1.0 .
# The base images come from Docker Hub; pin them by digest for production (--build-arg PYTHON_IMAGE=...@sha256:...).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Build: the two wheels, built by uv from this checkout, and their locked dependencies, into a venv.
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
WORKDIR /src
# The workspace's lock and every member's metadata (uv export reads them), the sources of two.
COPY pyproject.toml uv.lock ./
COPY hub/pyproject.toml hub/
COPY client/pyproject.toml client/
COPY local/pyproject.toml local/
COPY common/ common/
COPY agent/ agent/
COPY deploy/docker/install.sh /usr/local/bin/fedplane-install
RUN fedplane-install agent /src /opt/fedplane

# Run: the venv alone on a slim Python, as an unprivileged user (the chart's 65532).
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 65532 fedplane && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fedplane
COPY --from=build /opt/fedplane /opt/fedplane
# Bytecode was compiled at install: nothing is written beside the code (read-only root filesystem).
ENV PATH=/opt/fedplane/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 9464
ENTRYPOINT ["fedplane-agent"]
CMD ["--config", "/etc/fedplane/config/agent.yaml"]
