# syntax=docker/dockerfile:1
# lmserve for CPU nodes, serving the bundled models with no volume:
#   docker build -f deploy/docker/cpu.Dockerfile -t lmserve:0.1.0-cpu .
#   docker run --read-only --tmpfs /tmp --tmpfs /var/cache/lmserve:uid=10001,gid=10001 -p 8000:8000 lmserve:0.1.0-cpu
# No Docker engine runs on our machines, so every step below is a make target or a command that
# tests/deploy/test_dockerfile.py runs too (same install order, same pins: the Makefile holds them).
# The baked C kernels (make image-bake) are one library per x86-64 level, none -march=native: avx2
# (x86-64-v3), avx512 (x86-64-v4), avx512-vnni (+ AVX-512 VNNI: Cascade Lake, Ice Lake), avx512-bf16
# (+ VNNI and BF16: Cooper Lake, Sapphire Rapids and later, Zen 4 and later). Each node's server loads the
# best its CPU runs (logged at start: "C kernels: avx512-bf16 (...)"), so one image serves a mixed pool;
# LMSERVE_KERNEL_VARIANT forces one. A CPU below x86-64-v3 gets torch ops (no compiler in the image).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# PyTorch's CPU wheel index: the default index would bring the multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml Makefile ./
COPY service/ service/
COPY deploy/docker/ deploy/docker/
RUN make image-venv IMAGE_VENV=/opt/venv TORCH_INDEX=${TORCH_INDEX}
RUN make image-bake IMAGE_VENV=/opt/venv IMAGE_CACHE_DIR=/opt/lmserve/cache IMAGE_MODELS_DIR=/opt/lmserve/models \
    CONVERSION_CACHE_DIR=/tmp/lmserve-conversion

FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: the C kernels are OpenMP code (torch carries its own copy under another name).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lmserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin lmserve \
    && mkdir -p /var/cache/lmserve \
    && chown 10001:10001 /var/cache/lmserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/lmserve /opt/lmserve
COPY deploy/docker/entrypoint.sh deploy/docker/healthcheck.py deploy/docker/bake.py /opt/lmserve/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/lmserve/huggingface \
    BAKED_CACHE_DIR=/opt/lmserve/cache \
    LMSERVE_CACHE_DIR=/var/cache/lmserve \
    LMSERVE_MODEL=/opt/lmserve/models/smollm2-135m-instruct \
    LMSERVE_HOST=0.0.0.0 \
    LMSERVE_PORT=8000 \
    LMSERVE_GRPC_PORT=50051
RUN LMSERVE_CACHE_DIR=/opt/lmserve/cache python /opt/lmserve/bake.py verify --kernels --models /opt/lmserve/models
USER 10001:10001
WORKDIR /opt/lmserve
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/lmserve/healthcheck.py"]
ENTRYPOINT ["/opt/lmserve/entrypoint.sh"]
CMD ["serve"]
