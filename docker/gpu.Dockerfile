# CUDA image for the GPU stages: cache, train (torchrun) and eval.
# Build it with `make build IMAGES=gpu`: the Makefile first writes build/wheelhouse/ (the deepspec
# wheel and a requirements file taken from its metadata), the only part of the repository that this
# file copies. The torch 2.13.0 wheel on PyPI is the CUDA 13.0 build and brings its CUDA libraries
# as wheels, so the base image needs only to match that CUDA major version.
ARG BASE_IMAGE=nvcr.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base

# Ubuntu 24.04 ships Python 3.12; set PYTHON_VERSION to what the base image's apt sources provide.
ARG PYTHON_VERSION=3.12
# NOTE: apt package versions are not pinned: pins to an Ubuntu archive version stop building as soon
# as the archive publishes a security update. The base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf "/usr/bin/python${PYTHON_VERSION}" /usr/local/bin/python3

FROM base AS install

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
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

FROM base

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
LABEL org.opencontainers.image.title="deepspec-gpu" \
      org.opencontainers.image.description="deepspec CUDA stages: cache, train, eval" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="MIT"

USER 10001:10001
WORKDIR /workspace
ENTRYPOINT ["deepspec"]
CMD ["--help"]
