"""The HTTP transport (OpenAI-compatible, FastAPI): app.py (routes, middleware), wire.py (bodies -> neutral
inputs), serialize.py (presented outputs -> OpenAI JSON), sse.py (streams), errors.py, openapi.py, schemas.py,
middleware.py, json_body.py."""
