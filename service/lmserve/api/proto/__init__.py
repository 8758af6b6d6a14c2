"""Generated from protos/lmserve/v1/lmserve.proto by `make protos`; do not edit."""
