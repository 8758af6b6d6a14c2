# syntax=docker/dockerfile:1
# lmserve for NVIDIA GPU nodes (the NVIDIA container runtime brings the driver; torch's wheels bring CUDA):
#   docker build -f deploy/docker/cuda.Dockerfile -t lmserve:0.1.0-cuda .
#   docker run --gpus all --read-only --tmpfs /tmp -v lmserve-cache:/var/cache/lmserve -v /models:/models:ro \
#     -p 8000:8000 lmserve:0.1.0-cuda serve --model /models/my-model
# No Docker engine runs on our machines, so every step below is a make target or a command that
# tests/deploy/test_dockerfile.py runs too (same install order, same pins: the Makefile holds them).
# Models come from a volume; a bundled id (the default) is converted into the cache volume at the first
# start. The C kernels are CPU code and not baked here. The venv is vLLM's (its CUDA build from PyPI, with
# the torch it pins) with lmserve installed into it (make image-venv-vllm), so the image serves both
# --engine native and --engine vllm (the chart's `engine` value).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml Makefile ./
COPY service/ service/
COPY deploy/docker/ deploy/docker/
COPY deploy/tools/missing_requirements.py deploy/tools/
RUN make image-venv-vllm IMAGE_VENV=/opt/venv

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 lmserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin lmserve \
    && mkdir -p /var/cache/lmserve \
    && chown 10001:10001 /var/cache/lmserve
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/entrypoint.sh deploy/docker/healthcheck.py deploy/docker/bake.py /opt/lmserve/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/lmserve/huggingface \
    LMSERVE_CACHE_DIR=/var/cache/lmserve \
    LMSERVE_HOST=0.0.0.0 \
    LMSERVE_PORT=8000 \
    LMSERVE_GRPC_PORT=50051
RUN python /opt/lmserve/bake.py verify
USER 10001:10001
WORKDIR /opt/lmserve
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/lmserve/healthcheck.py"]
ENTRYPOINT ["/opt/lmserve/entrypoint.sh"]
CMD ["serve"]
