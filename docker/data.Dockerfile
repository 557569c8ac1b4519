# CPU image for the data-side stages: prompts, the regen client and export.
# Build it with `make build IMAGES=data`: the Makefile first writes build/wheelhouse/ (the deepspec
# wheel and a requirements file taken from its metadata), the only part of the repository that this
# file copies.
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

FROM ${BASE_IMAGE} AS install

# The default index serves the CPU-only torch build. PIP_NO_INDEX=1 installs from the wheels in
# build/wheelhouse/deps/ alone, for builds without access to a package index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# This stage installs the dependencies only. The final stage adds the deepspec wheel on top.
COPY build/wheelhouse/deps/ /wheelhouse/deps/
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" --find-links /wheelhouse/deps \
        "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir --find-links /wheelhouse/deps -r /wheelhouse/deps/requirements.txt

FROM ${BASE_IMAGE}

RUN groupadd --gid 10001 deepspec \
    && useradd --uid 10001 --gid 10001 --home-dir /workspace --no-create-home --shell /usr/sbin/nologin deepspec \
    && mkdir -p /workspace \
    && chown 10001:10001 /workspace

COPY --from=install /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/workspace \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The package goes in its own small layer on top of the dependencies, so a source change leaves the
# large virtualenv layer cached and already pushed. The wheel copy stays in its layer (a few hundred kB).
COPY build/wheelhouse/deepspec/ /tmp/wheelhouse/
RUN pip install --no-cache-dir --no-deps /tmp/wheelhouse/deepspec-*.whl \
    && rm -rf /tmp/wheelhouse \
    && pip check \
    && deepspec --help > /dev/null

# Labels last: their values change with every commit, and a changed build argument invalidates the
# build cache of every later step.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.title="deepspec-data" \
      org.opencontainers.image.description="deepspec CPU stages: prompts, regen client, export" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="MIT"

USER 10001:10001
WORKDIR /workspace
ENTRYPOINT ["deepspec"]
CMD ["--help"]
