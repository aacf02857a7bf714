# The one Neoplasma image: `neoplasma broker|proxy|operator ...` (the entry point is `neoplasma`).
#
#   docker build -t neoplasma:0.1.0 .
#   docker run --rm neoplasma:0.1.0 broker --host 0.0.0.0
#
# Two stages on the same pinned base: the builder installs the distribution and its
# dependencies into a virtual environment; the final stage copies only that environment (no
# pip, no build tools, no sources) and runs as the unprivileged UID/GID 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/neoplasma
WORKDIR /src
# Dependencies first, in a layer that changes only with pyproject.toml and constraints.txt: the
# runtime dependencies at the versions the tests ran with (scripts/lock.sh).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/neoplasma/bin/pip install -c constraints.txt --upgrade pip \
    && /opt/neoplasma/bin/pip install -c constraints.txt -r /tmp/requirements.txt
# Then the distribution itself (README.md is optional to the build). Byte-compiled ahead of
# time: the root filesystem is read-only at run time, and importing the kubernetes client
# from source takes seconds.
COPY pyproject.toml README.md* ./
COPY core/ core/
COPY ingest/ ingest/
COPY local/ local/
COPY broker/ broker/
COPY proxy/ proxy/
COPY operator/ operator/
COPY protos/ protos/
RUN /opt/neoplasma/bin/pip install --no-deps . \
    && /opt/neoplasma/bin/neoplasma --help >/dev/null \
    && /opt/neoplasma/bin/pip uninstall -y setuptools \
    && /opt/neoplasma/bin/pip uninstall -y pip \
    && find /opt/neoplasma -name __pycache__ -prune -exec rm -rf {} + \
    && /opt/neoplasma/bin/python -m compileall -q -j 0 /opt/neoplasma/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="neoplasma" \
      org.opencontainers.image.description="Real-time event push: brokers, proxies and neoplasma-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 neoplasma \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin neoplasma
COPY --from=builder /opt/neoplasma /opt/neoplasma
ENV PATH=/opt/neoplasma/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
# broker/proxy: 8080 HTTP (SSE, publish, /healthz, /metrics), 50051 gRPC, 50052 proxy control;
# operator: 8080 liveness (/healthz).
EXPOSE 8080 50051 50052
ENTRYPOINT ["neoplasma"]
CMD ["--help"]
