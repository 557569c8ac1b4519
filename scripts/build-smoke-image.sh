#!/usr/bin/env bash
# Prove the image path without a Docker engine or image pulls. The script builds the data image with
# `make build ENGINE=buildah` on a Debian bookworm base made by debootstrap and runs it with podman.
# Then it pushes the image with `make push` to a docker-registry on 127.0.0.1 and checks the catalog.
#
# Needs root and Debian's buildah, podman, runc, debootstrap and docker-registry (installed with
# apt-get when missing). The pip wheels come from this machine's package index, so nothing inside the
# image build needs the network.
#
# Environment:
#   SMOKE_DIR        container storage, base rootfs and registry data (default /var/tmp/deepspec-smoke)
#   SMOKE_PORT       registry port on 127.0.0.1 (default 5000)
#   DEBIAN_MIRROR    mirror for debootstrap (default http://deb.debian.org/debian)
#   SMOKE_CLEAN=1    delete SMOKE_DIR at the end (it keeps the base image for the next run otherwise)
#   DEEPSPEC_DATA_DIR  benchmark prompt files for a real `deepspec prompts` run in the container;
#                    without it that step is left out
set -euo pipefail

cd "$(dirname "$0")/.."

SMOKE_DIR=${SMOKE_DIR:-/var/tmp/deepspec-smoke}
SMOKE_PORT=${SMOKE_PORT:-5000}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/deepspec/base:bookworm
REGISTRY_HOST=127.0.0.1:${SMOKE_PORT}
REGISTRY=${REGISTRY_HOST}
# vfs and chroot isolation work without overlayfs, user namespaces or CAP_SYS_RESOURCE. vfs stores
# every layer as a full copy, so the build runs without --layers: one layer per stage.
STORAGE_FLAGS="--storage-driver vfs --root ${SMOKE_DIR}/storage --runroot ${SMOKE_DIR}/run"
# podman's defaults fail in containers without CAP_SYS_RESOURCE (crun cannot raise RLIMIT_NOFILE)
# and on hybrid cgroup v1 hosts, which crun does not support. runc with these flags works on both.
RUN_FLAGS="--cgroup-manager cgroupfs run --rm --runtime /usr/sbin/runc --network none
  --ulimit nofile=1024:4096 --ulimit nproc=1024:4096"

declare -a TIMINGS=()
step_started=0

start_step() {
    echo "== $1"
    step_started=$(date +%s.%N)
}

end_step() {
    local elapsed
    elapsed=$(echo "$(date +%s.%N) - ${step_started}" | bc)
    TIMINGS+=("$(printf '%-28s %7.1f s' "$1" "${elapsed}")")
}

fail() {
    echo "smoke-image: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (debootstrap, buildah and podman with vfs storage)"

missing=()
for tool in buildah podman runc debootstrap docker-registry curl bc; do
    command -v "${tool}" > /dev/null || missing+=("${tool}")
done
if ((${#missing[@]})); then
    start_step "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap docker-registry curl bc
    end_step "install tools"
fi

mkdir -p "${SMOKE_DIR}"
# shellcheck disable=SC2086  # the flag strings are meant to split into words
if podman ${STORAGE_FLAGS} image exists "${BASE_IMAGE}"; then
    echo "== base image ${BASE_IMAGE} already in ${SMOKE_DIR}/storage"
else
    start_step "debootstrap bookworm (minbase + python3)"
    rm -rf "${SMOKE_DIR}/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "${SMOKE_DIR}/rootfs" "${DEBIAN_MIRROR}" > "${SMOKE_DIR}/debootstrap.log"
    end_step "debootstrap"

    start_step "import ${BASE_IMAGE}"
    # shellcheck disable=SC2086
    tar -C "${SMOKE_DIR}/rootfs" -c . | podman ${STORAGE_FLAGS} import - "${BASE_IMAGE}" > /dev/null
    rm -rf "${SMOKE_DIR}/rootfs"
    end_step "import base"
fi

start_step "make build ENGINE=buildah IMAGES=data"
make --no-print-directory build ENGINE=buildah IMAGES=data REGISTRY="${REGISTRY}" WHEELHOUSE_DEPS=1 \
    ENGINE_FLAGS="${STORAGE_FLAGS}" ENGINE_BUILD_FLAGS="--isolation chroot" \
    BUILD_ARGS="--build-arg BASE_IMAGE=${BASE_IMAGE}" | tee "${SMOKE_DIR}/build.log"
end_step "make build (data)"
image=$(sed -n 's/^built //p' "${SMOKE_DIR}/build.log" | tail -n 1)
[[ -n ${image} ]] || fail "make build printed no 'built <image>' line; see ${SMOKE_DIR}/build.log"
tag=${image##*:}

start_step "podman run ${image}"
# shellcheck disable=SC2086
help_text=$(podman ${STORAGE_FLAGS} ${RUN_FLAGS} "${image}" prompts --help)
grep -q "usage: deepspec prompts" <<< "${help_text}" || fail "'deepspec prompts --help' printed: ${help_text}"
# shellcheck disable=SC2086
uid=$(podman ${STORAGE_FLAGS} ${RUN_FLAGS} --entrypoint id "${image}" -u)
[[ ${uid} == 10001 ]] || fail "the image runs as uid ${uid}, expected 10001"
end_step "podman run (2 containers)"
echo "${help_text}" | head -n 3
echo "runs as uid ${uid}"

# A real prompts stage in the container: the demo config on the benchmark prompt files.
# `make smoke-image` exports DEEPSPEC_DATA_DIR when the benchmark prompt files sit beside the repository.
data_dir=${DEEPSPEC_DATA_DIR:-}
if [[ -n ${data_dir} && -d ${data_dir} ]]; then
    data_dir=$(realpath "${data_dir}")
    start_step "podman run deepspec prompts"
    output_dir="${SMOKE_DIR}/prompts-output"
    rm -rf "${output_dir}"
    mkdir -p "${output_dir}"
    chown 10001:10001 "${output_dir}"
    # shellcheck disable=SC2086
    podman ${STORAGE_FLAGS} ${RUN_FLAGS} -v "${PWD}/configs:/config:ro" -v "${data_dir}:/data:ro" \
        -v "${output_dir}:/output" -e DEEPSPEC_DATA_DIR=/data \
        "${image}" prompts --config /config/demo.yaml --set storage.root=/output | tail -n 1
    manifests=("${output_dir}"/prompts/*/_MANIFEST.json)
    [[ -f ${manifests[0]} ]] || fail "deepspec prompts in the container wrote no _MANIFEST.json under ${output_dir}"
    [[ -s $(dirname "${manifests[0]}")/train.jsonl ]] || fail "deepspec prompts in the container wrote no train.jsonl"
    end_step "podman run prompts stage"
else
    echo "== DEEPSPEC_DATA_DIR is not set to a directory of benchmark prompt files: prompts stage not run"
fi

if curl -s -o /dev/null "http://${REGISTRY_HOST}/v2/"; then
    fail "something already listens on ${REGISTRY_HOST}; set SMOKE_PORT to a free port"
fi
# A fresh registry each run, so the catalog check cannot pass on an earlier run's push.
rm -rf "${SMOKE_DIR}/registry-data"
mkdir -p "${SMOKE_DIR}/registry-data"
cat > "${SMOKE_DIR}/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: ${SMOKE_DIR}/registry-data
http:
  addr: ${REGISTRY_HOST}
EOF
docker-registry serve "${SMOKE_DIR}/registry.yml" > "${SMOKE_DIR}/registry.log" 2>&1 &
registry_pid=$!
trap 'kill ${registry_pid} 2> /dev/null || true' EXIT
for _ in $(seq 50); do
    curl -s -o /dev/null "http://${REGISTRY_HOST}/v2/" && break
    sleep 0.2
done
curl -sf -o /dev/null "http://${REGISTRY_HOST}/v2/" || fail "registry did not start; see ${SMOKE_DIR}/registry.log"

start_step "make push ENGINE=buildah IMAGES=data"
make --no-print-directory push ENGINE=buildah IMAGES=data REGISTRY="${REGISTRY}" TAG="${tag}" \
    ENGINE_FLAGS="${STORAGE_FLAGS}" ENGINE_PUSH_FLAGS="--tls-verify=false --quiet"
end_step "make push (data)"

catalog=$(curl -sf "http://${REGISTRY_HOST}/v2/_catalog")
tags=$(curl -sf "http://${REGISTRY_HOST}/v2/deepspec-data/tags/list")
echo "catalog: ${catalog}"
echo "tags: ${tags}"
grep -q '"deepspec-data"' <<< "${catalog}" || fail "deepspec-data missing from the registry catalog"
grep -q "\"${tag}\"" <<< "${tags}" || fail "tag ${tag} missing from the registry"

# shellcheck disable=SC2086
local_bytes=$(podman ${STORAGE_FLAGS} image inspect --format '{{.Size}}' "${image}")
pushed_bytes=$(curl -sf \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://${REGISTRY_HOST}/v2/deepspec-data/manifests/${tag}" |
    python3 -c 'import json, sys; print(sum(layer["size"] for layer in json.load(sys.stdin)["layers"]))')

echo
echo "smoke image ${image}: OK"
printf '%s\n' "${TIMINGS[@]}"
echo "image size: $((local_bytes / 1000000)) MB unpacked, $((pushed_bytes / 1000000)) MB compressed in the registry"

kill "${registry_pid}" 2> /dev/null || true
if [[ ${SMOKE_CLEAN:-0} == 1 ]]; then
    rm -rf "${SMOKE_DIR}"
else
    # Keep only the base image for the next run: the data image is in the registry data now.
    # shellcheck disable=SC2086
    podman ${STORAGE_FLAGS} rmi --force "${image}" > /dev/null
    # shellcheck disable=SC2086
    podman ${STORAGE_FLAGS} image prune --force > /dev/null
fi
