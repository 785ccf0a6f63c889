# The autoscaler's own image. Base image from a build arg so builds work where the official image cannot
# be pulled: docker build --build-arg PYTHON_IMAGE=autoscaler-local/python:bookworm .
# PYTHON_BUILD_IMAGE (default PYTHON_IMAGE) is for the build stage only: the same image plus whatever
# package-index settings the build machine needs (here: autoscaler-local/python:bookworm-build), which
# thus never reach the final image.
ARG PYTHON_IMAGE=python:3.12-slim
ARG PYTHON_BUILD_IMAGE=

FROM ${PYTHON_BUILD_IMAGE:-${PYTHON_IMAGE}} AS build
RUN python3 -m venv /opt/venv
# Every package from the hashed lock (scripts/lock refreshes it), the build backend included; then the
# package itself, with no dependency resolution left to do.
COPY requirements/autoscaler.lock /src/requirements/autoscaler.lock
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /src/requirements/autoscaler.lock
COPY pyproject.toml README.md /src/
COPY autoscaler /src/autoscaler
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src

FROM ${PYTHON_IMAGE}
# No compiler, no pip cache, no sources: the venv is all the runtime needs.
COPY --from=build /opt/venv /opt/venv
COPY policies /app/policies
# A fixed uid so the Docker socket can be granted by group (compose: group_add: [docker socket's gid]).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin autoscaler
WORKDIR /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AUTOSCALER_POLICY=/app/policies/default.yaml \
    AUTOSCALER_METRICS_PORT=9419
EXPOSE 9419
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9419/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["autoscaler"]
CMD ["run"]
