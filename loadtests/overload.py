"""The scenarios of locustfile.py under OverloadShape: a ramp past capacity, a hold, then the end.

    .venv/bin/locust -f loadtests/overload.py --headless --host http://127.0.0.1:8000 \\
        --overload-peak-users 320 --overload-step-users 32 --overload-step-seconds 10 \\
        --overload-hold-seconds 30 ChatStreamUser

429/503 with Retry-After count as expected ("NAME [503 expected]" entries); any 5xx, truncated stream
or malformed chunk fails the run.
"""

from __future__ import annotations

from locustfile import ChatStreamUser, CompletionUser, EmbeddingsUser, GrpcUser, TokenizeUser

from lmload.overload_shape import OverloadShape

__all__ = ["ChatStreamUser", "CompletionUser", "EmbeddingsUser", "GrpcUser", "OverloadShape", "TokenizeUser"]
