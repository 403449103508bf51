//! One order is one trace across the services, as an OTLP collector sees
//! it: the test runs an OTLP/HTTP receiver (protobuf, decoded with the
//! OpenTelemetry proto types), starts the three services as processes
//! exporting to it, places an order, and follows the spans: the Order
//! Service's `POST /orders`, its `create order` and `send order`, the
//! Inventory Service's `process order` (a child of `create order`) and
//! `create inventory`, and the Order Service's `process inventory` — all in
//! the order's trace.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;
use common::{place, start_seeded, url};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use tandem_cli::serve::Service;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// Trace ids of its links.
    links: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Starts the receiver; returns its base URL and what it received.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let request =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut spans = sink.lock().unwrap();
                for resource_spans in request.resource_spans {
                    let service = resource_spans
                        .resource
                        .iter()
                        .flat_map(|resource| &resource.attributes)
                        .find(|attribute| attribute.key == "service.name")
                        .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
                        .map(|value| match value {
                            AnyValue::StringValue(name) => name.clone(),
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for scope in resource_spans.scope_spans {
                        for span in scope.spans {
                            spans.push(Received {
                                service: service.clone(),
                                name: span.name,
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                links: span.links.iter().map(|link| hex(&link.trace_id)).collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_the_order_and_inventory_services() {
    let (endpoint, received) = receiver().await;
    // The services inherit these (this test binary has no other test).
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    std::env::remove_var("OTEL_SERVICE_NAME");

    let dir = tempfile::tempdir().unwrap();
    let system = start_seeded(dir.path()).await;
    let http = system.http().clone();
    let order = url(&system, Service::Order);
    let id = place(&http, &order, "1234", &[("widget", 1)]).await;
    common::settled(&http, &order, &id).await;

    let spans = common::eventually("the order's spans reach the collector", || {
        let spans = received.lock().unwrap().clone();
        async move {
            let Some(request) = spans
                .iter()
                .find(|span| span.service == "order" && span.name == "POST /orders")
            else {
                return Err(format!("no POST /orders span among {spans:?}"));
            };
            let in_trace: Vec<&Received> = spans
                .iter()
                .filter(|span| span.trace_id == request.trace_id)
                .collect();
            let has = |service: &str, name: &str| {
                in_trace
                    .iter()
                    .any(|span| span.service == service && span.name == name)
            };
            // The relays' send spans are in other traces, linked to this one;
            // they may come in a later export than the rest.
            let linked = |service: &str, name: &str| {
                spans.iter().any(|span| {
                    span.service == service
                        && span.name == name
                        && span.links.contains(&request.trace_id)
                })
            };
            if has("order", "create order")
                && has("inventory", "process order")
                && has("inventory", "create inventory")
                && has("order", "process inventory")
                && linked("order", "send order")
                && linked("inventory", "send inventory")
            {
                Ok(spans)
            } else {
                Err(format!("the trace so far: {in_trace:?}"))
            }
        }
    })
    .await;
    let request = spans
        .iter()
        .find(|span| span.service == "order" && span.name == "POST /orders")
        .unwrap();
    let trace = &request.trace_id;
    // The span of `service` named `name` whose parent is `parent` (a trace
    // holds several `create order`: the order's placing, and its
    // confirmation published while processing the Inventory's answer).
    let child_of = |service: &str, name: &str, parent: &Received| -> Received {
        spans
            .iter()
            .find(|span| {
                span.service == service
                    && span.name == name
                    && span.trace_id == *trace
                    && span.parent_span_id == parent.span_id
            })
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "no {name} of {service} under {} of {}: {spans:?}",
                    parent.name, parent.service
                )
            })
    };
    // Parents: the request creates the event; the Inventory Service
    // processes it as a child of its creation, and what it publishes is
    // created inside that processing; the Order Service processes that.
    let create_order = child_of("order", "create order", request);
    let process_order = child_of("inventory", "process order", &create_order);
    let create_inventory = child_of("inventory", "create inventory", &process_order);
    child_of("order", "process inventory", &create_inventory);
    // The relays' sends link to what they sent.
    assert!(
        spans.iter().any(|span| span.service == "order"
            && span.name == "send order"
            && span.links.contains(trace)),
        "no send order linked to the trace: {spans:?}"
    );
    assert!(
        spans.iter().any(|span| span.service == "inventory"
            && span.name == "send inventory"
            && span.links.contains(trace)),
        "no send inventory linked to the trace: {spans:?}"
    );
}
