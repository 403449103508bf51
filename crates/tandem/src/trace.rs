//! Distributed traces across services, carried by the events themselves:
//! W3C `traceparent` in the envelope, spans named as OpenTelemetry's
//! messaging conventions name them.
//!
//! - An event appended while a span with a trace is current (an HTTP
//!   request's, a consumer's `process` span) gets a `create {topic}` span,
//!   child of it, whose context becomes the envelope's `traceparent`.
//! - The relay's `send {topic}` span for a batch links to the `create`
//!   context of each event it publishes.
//! - A consumer's `process {topic}` span for an event is a child of the
//!   event's `traceparent` and is current while the handler runs, so what
//!   the handler publishes carries it: one order is one trace across the
//!   Order, Inventory and Order services again.
//!
//! The sampler's decision (`OTEL_TRACES_SAMPLER`, e.g.
//! `parentbased_traceidratio` with `OTEL_TRACES_SAMPLER_ARG=0.01`) is
//! kept along the chain: an unsampled trace makes no `create` or `process`
//! span, only its `traceparent` travels.
//!
//! The spans are `tracing` spans; a process that installs the
//! `tracing-opentelemetry` layer and a propagator (every `tandem` command
//! does, exporting over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set)
//! turns them into OpenTelemetry spans. Until [`enable`] is called, none of
//! this costs anything: no span is made and no envelope is read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns tracing on for this process (the `tandem` commands do, with a
/// tracer installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are made and contexts carried.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The messaging system name in span attributes.
pub const MESSAGING_SYSTEM: &str = "tandem";

/// The W3C `traceparent` of `span`, if it belongs to a trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier)
    });
    carrier.remove("traceparent")
}

/// The trace id of `span` (32 hex digits), if it belongs to a trace: a
/// field of the spans that log lines carry.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Records `span`'s trace id in its `trace_id` field (declared empty), so
/// that log lines inside it name the trace.
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(trace_id) = trace_id_of(span) {
        span.record("trace_id", trace_id);
    }
}

/// The context a W3C `traceparent` names, if it is a valid one.
pub fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` a child of the remote context in `headers`' `traceparent`
/// (an incoming request), if there is a valid one.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(context) = traceparent.and_then(context_of) {
        let _ = span.set_parent(context);
    }
}

/// The `traceparent` for an event of `topic` appended now: a `create`
/// span's, child of the current span, when the current span has a trace.
pub fn create(topic: &str, event_type: &str, subject: &str) -> Option<String> {
    if !enabled() {
        return None;
    }
    let current = tracing::Span::current();
    let context = current.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return None;
    }
    // A trace the sampler left out is carried on as it is (its flags say
    // so downstream) without a span of its own: unsampled events cost a
    // string, not a span.
    if !span_context.is_sampled() {
        return traceparent_of(&current);
    }
    let span = tracing::info_span!(
        parent: &current,
        "create",
        otel.name = format!("create {topic}"),
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "create",
        messaging.destination.name = topic,
        cloudevents.event_type = event_type,
        cloudevents.event_subject = subject,
    );
    traceparent_of(&span)
}

/// The current span's `traceparent` when it belongs to a trace the
/// sampler left out: what every event appended under it carries, the same
/// for all, without a span each. `None` when tracing is off, there is no
/// trace, or the trace is sampled (its events get `create` spans).
pub fn unsampled_parent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let current = tracing::Span::current();
    let context = current.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() && !span_context.is_sampled() {
        traceparent_of(&current)
    } else {
        None
    }
}

/// Whether `traceparent` carries the sampled flag: a look at its last two
/// hex digits (`00-<trace id>-<parent id>-<flags>`), with no parse of the
/// rest. An unsampled event, the common case under ratio sampling, is
/// thereby told apart for the price of a byte comparison; a sampled one is
/// checked whole when its span is made ([`process`]), and an invalid one
/// gets no span there.
pub fn sampled(traceparent: &str) -> bool {
    let bytes = traceparent.as_bytes();
    if bytes.len() != 55 || bytes[52] != b'-' {
        return false;
    }
    let low = bytes[54];
    let flags = match low {
        b'0'..=b'9' => low - b'0',
        b'a'..=b'f' => low - b'a' + 10,
        _ => return false,
    };
    flags & 1 == 1
}

/// A `send {topic}` span for a relay batch, linked to the `create` context
/// of each sampled event that has one. `traceparents` is asked for only
/// when the span itself is sampled, so an unsampled batch reads no
/// envelope.
pub fn send(
    topic: &str,
    count: usize,
    traceparents: impl FnOnce() -> Vec<String>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.name = format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "send",
        messaging.destination.name = topic,
        messaging.batch.message_count = count,
    );
    if !span.context().span().span_context().is_sampled() {
        return span;
    }
    for traceparent in traceparents() {
        if !sampled(&traceparent) {
            continue;
        }
        if let Some(context) = context_of(&traceparent) {
            span.add_link(context.span().span_context().clone());
        }
    }
    span
}

/// A `process {topic}` span for `envelope` applied by consumer `group`,
/// child of the event's `traceparent`; `None` when tracing is off or the
/// event carries no trace.
pub fn process(group: &str, envelope: &crate::Envelope) -> Option<tracing::Span> {
    if !enabled() {
        return None;
    }
    // An unsampled trace ends here, told by its flags alone: nothing of it
    // is parsed or exported.
    let traceparent = envelope.traceparent.as_deref().filter(|tp| sampled(tp))?;
    let context = context_of(traceparent)?;
    if !context.span().span_context().is_sampled() {
        return None;
    }
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {}", envelope.source),
        otel.kind = "consumer",
        messaging.system = MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.destination.name = envelope.source.as_str(),
        messaging.consumer.group.name = group,
        messaging.message.id = envelope.id.to_string(),
        cloudevents.event_type = envelope.event_type.as_str(),
        cloudevents.event_subject = envelope.subject.as_str(),
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(context);
    record_trace_id(&span);
    Some(span)
}

/// Runs `work` inside consumer `group`'s `process` span of `envelope`
/// (see [`process`]), or plainly when there is none.
pub fn processing<R>(group: &str, envelope: &crate::Envelope, work: impl FnOnce() -> R) -> R {
    match process(group, envelope) {
        Some(span) => span.in_scope(work),
        None => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::sampled;

    #[test]
    fn the_sampled_flag_is_read_from_the_last_two_hex_digits() {
        let id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        assert!(sampled(&format!("{id}-01")));
        assert!(sampled(&format!("{id}-03")));
        assert!(!sampled(&format!("{id}-00")));
        assert!(!sampled(&format!("{id}-02")));
        // Not a traceparent at all, or cut short: never sampled.
        assert!(!sampled(""));
        assert!(!sampled(&format!("{id}-0")));
        assert!(!sampled(&format!("{id}-0g")));
        assert!(!sampled(&format!("{id}_01")));
    }
}
