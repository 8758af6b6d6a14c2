"""`helm test`'s check of a release, run in the lmserve image against the release's Service: readiness, the
model list, one greedy completion, and (plaintext gRPC) the gRPC health service. Standard library and the
image's grpcio only; the environment names the Service and the API key file."""

import json
import os
import sys
import urllib.request

HOST = os.environ["LMSERVE_TEST_HOST"]
BASE = f"http://{HOST}:{os.environ['LMSERVE_TEST_HTTP_PORT']}"
GRPC_PORT = int(os.environ.get("LMSERVE_TEST_GRPC_PORT") or 0)
KEY_FILE = os.environ.get("LMSERVE_TEST_API_KEY_FILE", "")
HEADERS = {"Content-Type": "application/json"}
if KEY_FILE and os.path.exists(KEY_FILE):
    keys = [line.strip() for line in open(KEY_FILE, encoding="utf-8") if line.strip()]
    if keys:
        HEADERS["Authorization"] = f"Bearer {keys[0]}"


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, headers=HEADERS, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.loads(response.read() or b"null")


def main():
    status, _ = call("/readyz")
    print(f"GET /readyz: {status}")
    status, models = call("/v1/models")
    model = models["data"][0]["id"]
    print(f"GET /v1/models: {status}, serving {model}")
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    status, completion = call("/v1/completions", body)
    tokens = completion["usage"]["completion_tokens"]
    assert tokens >= 1, completion
    print(f"POST /v1/completions: {status}, {tokens} tokens: {completion['choices'][0]['text']!r}")
    if GRPC_PORT and os.environ.get("LMSERVE_TEST_GRPC_TLS") != "true":
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{HOST}:{GRPC_PORT}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
        print("gRPC health: SERVING")
    elif GRPC_PORT:
        print("gRPC health: not checked (the port serves TLS; check it with a client holding the CA)")
    print("ok")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # one line a `helm test --logs` reader can act on
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
