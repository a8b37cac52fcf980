"""OpenTelemetry spans for a request across proxy, hub, worker and engine (the ``ghubai[otel]`` extra).

The W3C trace context (``traceparent``, ``tracestate``) travels in HTTP headers from the client to the
proxy and on to the hub, in the ``trace`` field of the request frame from the hub to the worker, and in
HTTP headers again from the worker to the engine. Without opentelemetry installed, or with it installed
but no tracer provider set (no exporter configured), every function here does nothing — not even a
non-recording span per request — and the headers pass through untouched. ``setup`` sends spans over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``..._TRACES_ENDPOINT``) is set, named ``ghubai-ROLE`` unless ``OTEL_SERVICE_NAME`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import trio

try:
    from opentelemetry import propagate, trace
except ImportError:  # the extra is not installed
    propagate = trace = None  # type: ignore[assignment]


def _unquoted(record: logging.LogRecord) -> bool:
    """The SDK's warning of an OTEL_EXPORTER_OTLP_HEADERS entry it cannot read, without the entry,
    which quotes a collector's token whole (``Authorization:Bearer ...``, a colon for the "=")."""
    record.msg, record.args = ("OTEL_EXPORTER_OTLP_HEADERS: an entry is not name=value, or holds a character a "
                               "header cannot (the entry is not shown: it may hold a token)"), ()
    return True


log = logging.getLogger("ghubai.tracing")
FLUSH_S = 1.0  # for the spans still held when a role stops


def active() -> bool:
    """Spans are recorded: the extra is installed and a tracer provider was set (``setup``, or a test's)."""
    return trace is not None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def carrier(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """HTTP header pairs as ``span`` reads them; nothing to decode on each request when not tracing."""
    if not active():
        return {}
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in raw}


@contextmanager
def span(name: str, carrier: Mapping[str, str], kind: str = "server", **attributes: Any) -> Iterator[Any]:
    """A span for the work in the ``with`` block, child of the context ``carrier``'s headers carry."""
    if not active():
        yield None
        return
    parent = propagate.extract(carrier)
    with trace.get_tracer("ghubai").start_as_current_span(
            name, context=parent, kind=trace.SpanKind.SERVER if kind == "server" else trace.SpanKind.CLIENT,
            attributes={key: value for key, value in attributes.items() if value is not None}) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Attributes for the current span, learnt after it began (the model, the status)."""
    if active():
        current = trace.get_current_span()
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(key, value)


CONTEXT_HEADERS = ("traceparent", "tracestate")


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Put the current span's context in ``headers`` in place of the one they carried (nothing when
    there is no recording span): a client's ``tracestate`` went on beside a new trace's ``traceparent``
    when the client's was invalid, or when the tracer refused the state (W3C: a state is read only with
    its parent)."""
    if active():
        for name in CONTEXT_HEADERS:
            headers.pop(name, None)
        propagate.inject(headers)
    return headers


def setup(role: str) -> None:
    """Export spans over OTLP when the environment names an endpoint and the extra is installed."""
    if trace is None or not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                             or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but %s is missing: pip install 'ghubai[otel]'", error.name)
        return
    logging.getLogger("opentelemetry.util.re").addFilter(_unquoted)
    for name in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
        logging.getLogger(name).setLevel(logging.ERROR)  # (a client's odd trace headers, quoted at WARNING)
    # no flush at exit by the SDK (it waited 13-19 s for a collector that was down, on any stop): ``flush``
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                                        or f"ghubai-{role}"}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # exports from the SDK's own thread
    trace.set_tracer_provider(provider)
    log.info("tracing: OTLP spans as %s", provider.resource.attributes["service.name"])


async def flush() -> None:
    """Export the spans still held, for at most ``FLUSH_S``, as a role stops. The SDK's export blocks
    with no bound a caller can set, so it runs in a thread that is left to the process's exit when
    the collector does not answer in time (its spans are lost, the stop is not held)."""
    provider = trace.get_tracer_provider() if trace is not None else None
    if provider is None or not hasattr(provider, "force_flush"):
        return
    with trio.move_on_after(FLUSH_S):
        await trio.to_thread.run_sync(provider.force_flush, abandon_on_cancel=True)
