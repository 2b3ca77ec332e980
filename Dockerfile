# syntax=docker/dockerfile:1
# The meshbank services image: `meshbank serve <service>` and `meshbank migrate`, as
# the Kubernetes manifests of `meshbank render k8s` run them (the sidecar and edge use
# the upstream Envoy image, the database the upstream CockroachDB image).
#
# The development machines have no container engine, so this file is not built or
# tested here; CI with a container engine builds it (docs/deploy-kubernetes.md):
#   docker build -t ghcr.io/meshbank/meshbank:0.1.0 .
# The manifests run it as uid 10001 with a read-only root filesystem.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.11-slim-bookworm

# Build stage: a virtualenv with the exactly pinned dependencies and meshbank itself.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/meshbank
COPY pyproject.toml constraints.txt README.md ./
COPY gen/python gen/python
COPY services services
COPY mesh mesh
COPY regions regions
RUN /opt/meshbank/bin/pip install -c constraints.txt pip==26.3 \
 && /opt/meshbank/bin/pip install -c constraints.txt . \
 && /opt/meshbank/bin/python -m compileall -q /opt/meshbank

# Runtime stage: the same Python, the virtualenv (at the same path, so its scripts'
# shebangs hold), an unprivileged user and nothing from the build.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 meshbank \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshbank
COPY --from=build /opt/meshbank /opt/meshbank
ENV PATH=/opt/meshbank/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["meshbank"]
CMD ["--help"]
