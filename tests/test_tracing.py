"""service/lmserve/tracing.py without a server: phases from a record, the OTLP URL, span export, and no cost when off."""

from __future__ import annotations

import subprocess
import sys

from lmserve.logs import AccessRecord
from lmserve.tracing import Phase, build_tracer, request_phases, traces_url
from lmserve.types import RequestTiming


def test_phases_of_a_generation_request() -> None:
    record = AccessRecord("rid", "http", started=10.0, submitted=10.5)
    record.timings = [
        RequestTiming(arrival_time=10.6, first_scheduled_time=11.0, first_token_time=11.5, finished_time=13.0),
        None,  # an engine that does not time its sequences
        RequestTiming(arrival_time=10.6, first_scheduled_time=None, first_token_time=None, finished_time=12.0),
    ]
    assert request_phases(record, finished=13.2) == [
        Phase("admission", 10.0, 10.5),
        Phase("queue", 10.6, 11.0, 0),
        Phase("prefill", 11.0, 11.5, 0),
        Phase("decode", 11.5, 13.0, 0),
        Phase("queue", 10.6, 12.0, 2),  # aborted while waiting: queued until the end, never prefilled
    ]


def test_a_refused_request_is_all_admission() -> None:
    assert request_phases(AccessRecord("rid", "http", started=1.0), finished=1.25) == [Phase("admission", 1.0, 1.25)]


def test_traces_url() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://x.test/otlp/v1/traces") == "https://x.test/otlp/v1/traces"


def test_export_converts_monotonic_times_with_one_offset() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer = build_tracer(None, exporter=exporter)
    assert tracer is not None
    record = AccessRecord("rid-7", "http", started=100.0, submitted=100.25, prompt_tokens=5, completion_tokens=2)
    record.timings = [RequestTiming(100.5, 101.0, 101.5, 102.0)]
    tracer.export(record, "POST", "/v1/completions", 200, 102.75, None)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["POST /v1/completions"]
    assert set(spans) == {"POST /v1/completions", "admission", "queue", "prefill", "decode"}
    assert dict(root.attributes) == {
        "lmserve.request_id": "rid-7",
        "lmserve.transport": "http",
        "http.request.method": "POST",
        "url.path": "/v1/completions",
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 2,
    }
    # Offsets from the root's start are exact: one offset converts every time.
    start = root.start_time
    relative_ms = {n: ((s.start_time - start) / 1e6, (s.end_time - start) / 1e6) for n, s in spans.items()}
    assert relative_ms == {
        "POST /v1/completions": (0, 2750),
        "admission": (0, 250),
        "queue": (500, 1000),
        "prefill": (1000, 1500),
        "decode": (1500, 2000),
    }
    assert all(s.parent.span_id == root.context.span_id for n, s in spans.items() if n != root.name)
    tracer.shutdown()


def test_tracing_off_imports_no_opentelemetry_sdk() -> None:
    code = (
        "import sys\n"
        "import lmserve.app, lmserve.api.http.app\n"
        "from lmserve.tracing import build_tracer\n"
        "assert build_tracer(None) is None\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
