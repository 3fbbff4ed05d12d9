"""OpenTelemetry traces of Rank and Retrieve (the ``tracing`` extra; off by default).

One trace per sampled Rank: a ``Rank`` server span (the caller's incoming
``traceparent`` honoured: its trace, and its sampling decision, ParentBased),
a child span per stage (``user_features``, ``retrieve``, ``item_features``,
``score``, ``rerank``, ``fallback``) with the stage's deadline as an attribute,
each rung taken as an event, and the answer's artifact version. The Retrieve
call carries the ``retrieve`` span's context in W3C ``traceparent`` metadata, so
the candidate service's ``Retrieve`` span (and its ``search`` child) joins the
same trace, in another process.

Spans are exported over OTLP/HTTP by a batch processor (off the request path):
to ``endpoint`` when set, else where the standard ``OTEL_EXPORTER_OTLP_*``
variables say. ``sample_ratio`` is the share of traces started here (a caller's
sampled ``traceparent`` is always followed). Disabled, nothing is imported and
each call costs one attribute check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import Field

from sieve.config import Frozen

log = logging.getLogger(__name__)


class TracingConfig(Frozen):
    """``[ranker.tracing]`` / ``[candidate.tracing]``."""

    enabled: bool = False
    sample_ratio: float = Field(0.01, ge=0.0, le=1.0)
    """Share of new traces recorded (ParentBased: a caller's decision wins)."""
    endpoint: str = ""
    """OTLP/HTTP traces endpoint, e.g. ``http://collector:4318/v1/traces``; empty:
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    service_name: str = ""
    """``service.name`` of the spans; empty: ``sieve-ranker`` / ``sieve-candidate``."""


class Tracer:
    """A service's tracer; ``None`` of it (``open_tracer`` with tracing off) means
    no tracing at all."""

    def __init__(self, config: TracingConfig, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        name = config.service_name or service
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=config.endpoint or None)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("sieve")
        self.propagator = TraceContextTextMapPropagator()
        log.info(
            "tracing on: service %s, sample ratio %g, OTLP/HTTP to %s",
            name, config.sample_ratio, config.endpoint or "the OTEL_* variables' endpoint",
        )  # fmt: skip

    def extract(self, metadata: Sequence[tuple[str, Any]] | None) -> Any:
        """The context an incoming call's ``traceparent`` metadata carries."""
        carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
        return self.propagator.extract(carrier)

    def inject(self) -> list[tuple[str, str]]:
        """``traceparent`` (and ``tracestate``) metadata of the current span."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return list(carrier.items())

    @contextmanager
    def server_span(
        self, name: str, metadata: Sequence[tuple[str, Any]] | None, **attributes: Any
    ) -> Iterator[Any]:
        from opentelemetry.trace import SpanKind

        with self.tracer.start_as_current_span(
            name, context=self.extract(metadata), kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def stage_spans(
        self,
        parent: Any,
        start_ns: int,
        marks: Sequence[tuple[str, int]],
        deadlines_ms: Mapping[str, float],
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """One child span of ``parent`` per stage of a finished Rank, from its
        marks (stage, microseconds since the previous mark), with the stage's
        deadline (ms after the request began); ``skip``: stages recorded live."""
        from opentelemetry import trace

        if not parent.get_span_context().is_valid or not parent.is_recording():
            return
        ctx = trace.set_span_in_context(parent)
        t = start_ns
        for stage, micros in marks:
            end = t + micros * 1000
            if stage not in skip:
                attrs: dict[str, str | float] = {"sieve.stage": stage}
                if stage in deadlines_ms:
                    attrs["sieve.deadline_ms"] = round(deadlines_ms[stage], 3)
                s = self.tracer.start_span(stage, context=ctx, start_time=t, attributes=attrs)
                s.end(end_time=end)
            t = end

    def shutdown(self) -> None:
        self.provider.shutdown()


def open_tracer(config: TracingConfig, service: str) -> Tracer | None:
    return Tracer(config, service) if config.enabled else None
