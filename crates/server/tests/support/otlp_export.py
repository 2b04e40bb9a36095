"""Sends GenAI spans to Apex with OpenTelemetry's official Python SDK and OTLP/HTTP exporter
(protobuf, gzip), as an instrumented application would, and prints what the exporter
answered as one JSON object for the Rust test to check.

The spans are recorded first, then exported twice with the same exporter: the second
export is what an exporter's retry sends, and Apex must store each span once.

Usage: python3 otlp_export.py BASE_URL API_KEY
"""

import json
import sys

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def main() -> None:
    base_url, key = sys.argv[1:3]
    recorded = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "python-support-bot"}))
    provider.add_span_processor(SimpleSpanProcessor(recorded))
    tracer = provider.get_tracer("apex-otlp-check")

    # Two chat calls with the GenAI conventions' attributes, one span that is not an LLM call.
    with tracer.start_as_current_span("handle request"):
        with tracer.start_as_current_span("chat gpt-4o-mini") as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.provider.name", "openai")
            span.set_attribute("gen_ai.request.model", "gpt-4o-mini")
            span.set_attribute("gen_ai.response.model", "gpt-4o-mini-2024-07-18")
            span.set_attribute("gen_ai.usage.input_tokens", 2000)
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", 1000)
            span.set_attribute("gen_ai.usage.output_tokens", 300)
        with tracer.start_as_current_span("chat gpt-4o") as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.system", "openai")
            span.set_attribute("gen_ai.request.model", "gpt-4o")
            span.set_attribute("gen_ai.usage.input_tokens", 1000)
            span.set_attribute("gen_ai.usage.output_tokens", 100)
            # Whoever the application says the user is, the key's owner owns the row.
            span.set_attribute("user.id", "someone-else")
    provider.shutdown()
    spans = recorded.get_finished_spans()

    exporter = OTLPSpanExporter(
        endpoint=base_url + "/otlp/v1/traces",
        headers={"Authorization": "Bearer " + key},
        compression=Compression.Gzip,
        timeout=30,
    )
    results = [exporter.export(spans).name for _ in range(2)]
    exporter.shutdown()
    print(json.dumps({"spans": len(spans), "results": results}))


if __name__ == "__main__":
    main()
