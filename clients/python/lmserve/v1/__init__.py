"""lmserve's gRPC API, package `lmserve.v1`: messages in `lmserve_pb2`, stubs in `lmserve_pb2_grpc`.

The modules beside this file are generated from protos/lmserve/v1/lmserve.proto by `make protos`; do not
edit them. `lmserve` itself is a namespace package (no __init__.py), so other distributions may add to it.
"""
