"""OpenTelemetry across the grid, in one process so that the SDK's in-memory exporter sees every role:
one trace from the client's context through proxy, hub, worker and the engine (the simulator)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import chat, eventually

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class WhileRecording(SimpleSpanProcessor):
    """The tracer provider is global for the process: keep spans only while this module's test runs."""
    recording = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            super().on_end(span)


EXPORTER = InMemorySpanExporter()
PROCESSOR = WhileRecording(EXPORTER)


@pytest.fixture
def spans() -> Any:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider.add_span_processor(PROCESSOR)
    PROCESSOR.recording = True
    EXPORTER.clear()
    yield EXPORTER
    PROCESSOR.recording = False


async def test_one_trace_from_client_to_engine(grid: Any, spans: InMemorySpanExporter) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    spans.clear()  # the health checks before are not part of it

    response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(stream=True), headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "X-Request-ID": "traced-1"})
    assert response.status_code == 200

    def named(prefix: str) -> ReadableSpan:
        found = [span for span in spans.get_finished_spans() if span.name.startswith(prefix)]
        assert len(found) == 1, f"{prefix}: {[span.name for span in spans.get_finished_spans()]}"
        return found[0]

    async def all_ended() -> bool:
        names = [span.name for span in spans.get_finished_spans()]
        return all(any(name.startswith(prefix) for name in names)
                   for prefix in ("sim POST", "engine ", "POST /v1/chat/completions"))

    await eventually(all_ended, "every role to end its span")
    chain = [named("sim POST /api/chat"), named("engine openai.chat")]
    entries = [span for span in spans.get_finished_spans() if span.name == "POST /v1/chat/completions"]
    assert len(entries) == 2  # proxy and hub
    proxy_span = next(span for span in entries if span.parent and span.parent.span_id == int(CLIENT_SPAN, 16))
    hub_span = next(span for span in entries if span is not proxy_span)
    chain = [proxy_span, hub_span, *reversed(chain)]
    assert {format(span.context.trace_id, "032x") for span in chain} == {CLIENT_TRACE}
    for parent, child in zip(chain, chain[1:]):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id, child.name
    assert proxy_span.kind == trace.SpanKind.SERVER and chain[2].kind == trace.SpanKind.CLIENT
    assert proxy_span.attributes["ghubai.request_id"] == hub_span.attributes["ghubai.request_id"] == "traced-1"
    assert hub_span.attributes["gen_ai.request.model"] == "sim"
    assert hub_span.attributes["http.response.status_code"] == 200
    assert chain[2].attributes["gen_ai.usage.output_tokens"] > 0
