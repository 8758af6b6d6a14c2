"""The API layer: everything that knows HTTP or gRPC lives here, and nothing below it does.

The transport-neutral core: admission.py (key, limits, queue), accounting.py (request id, access record),
plan.py (the one validation step -> GenerationPlan), stream.py + account.py (running a plan),
presentation.py (the one presentation step), generation_call.py / embedding_call.py / tokens.py /
models.py / moderation.py (each endpoint's call), errors.py (one table: error -> HTTP status and gRPC code).
The two transports only parse and serialize: http/ and grpc/.
"""
