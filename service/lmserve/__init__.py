"""lmserve: a model-serving microservice (`lmserve serve`, `python -m lmserve`)."""

# The gRPC client distribution (clients/python, `lmserve-grpc`) installs its stubs as `lmserve.v1` into the
# same name; extending the path lets both be imported side by side, whichever way each was installed.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
