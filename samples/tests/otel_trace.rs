//! One OpenTelemetry trace from an HTTP request to the last handler it causes, across both sample services:
//! `POST /orders` (ordering) → the producer span of `OrderStatusChangedToAwaitingValidation` → ordering's relay
//! sending it → catalog's handler → `OrderStockConfirmed` → catalog's relay → ordering's handler →
//! `OrderStatusChangedToPaid` → catalog's handler. Exported through the OpenTelemetry SDK's in-memory exporter by
//! the same subscriber the services install for OTLP ([`samples::telemetry::install`]); every parent link must
//! name an exported span of the trace. On the in-process bus and on RabbitMQ.
//!
//! Its own binary: it installs the process's global subscriber.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bus_core::EventBus;
use bus_core::trace::SpanContext;
use integration_tests::{delete_topology, rabbit_bus, unique, wait_until};
use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use samples::Service;
use samples::client::ShopClient;
use samples::config::DatabaseUrl;
use samples::demo::{Demo, DemoConfig, seed};
use samples::host::{ServiceOptions, listen};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn exporter() -> InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
            samples::telemetry::install(&provider);
            (exporter, provider)
        })
        .0
        .clone()
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
}

fn spans_of(trace: &SpanContext) -> Vec<SpanData> {
    let id = opentelemetry::trace::TraceId::from(trace.trace_id);
    exporter().get_finished_spans().unwrap().into_iter().filter(|s| s.span_context.trace_id() == id).collect()
}

/// The span named `name` for which `matches` holds and whose parent is `parent` (a retried handler or a
/// re-sent event may leave others beside it).
fn find<'a>(
    spans: &'a [SpanData],
    name: &str,
    what: &str,
    parent: SpanId,
    matches: impl Fn(&SpanData) -> bool,
) -> &'a SpanData {
    spans.iter().find(|s| s.name == name && matches(s) && s.parent_span_id == parent).unwrap_or_else(|| {
        panic!("no {name} span for {what} with parent {parent}; the trace has: {:#?}", summary(spans))
    })
}

fn summary(spans: &[SpanData]) -> Vec<String> {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {:?} id {} parent {} type {:?} group {:?}",
                s.name,
                s.span_kind,
                s.span_context.span_id(),
                s.parent_span_id,
                attribute(s, "event_type"),
                attribute(s, "group")
            )
        })
        .collect()
}

/// Places one order with a `traceparent` of our own and checks the whole trace it causes.
async fn one_trace_across_both_services(client: &ShopClient, catalog: &str, ordering: &str) {
    exporter();
    let stock = seed(client).await.expect("seeded");
    let product = *stock.keys().next().unwrap();
    let caller = SpanContext::root();
    let response = reqwest::Client::new()
        .post(format!("{}/orders", client.ordering))
        .header("traceparent", caller.traceparent())
        .json(&serde_json::json!({ "buyer": "traced-buyer", "items": [{ "product_id": product, "units": 1 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let served = SpanContext::parse(response.headers()["traceparent"].to_str().unwrap()).unwrap();
    let order: Uuid = response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    wait_until("the order is paid and the sale recorded in the catalog", Duration::from_secs(30), || async {
        let paid = client.orders().await.unwrap().iter().any(|o| o.id == order && o.status == "paid");
        let recorded = spans_of(&caller).iter().any(|s| {
            s.name == "consume"
                && attribute(s, "event_type").as_deref() == Some("OrderStatusChangedToPaid")
                && attribute(s, "group").as_deref() == Some(catalog)
        });
        paid && recorded
    })
    .await;
    // The relays' send spans end with the broker's confirmation, a little after the handling may have.
    let sends_done = || spans_of(&caller).iter().filter(|s| s.name == "send").count() >= 3;
    wait_until("the three send spans are over", Duration::from_secs(10), || async { sends_done() }).await;

    let spans = spans_of(&caller);
    // The request continues the caller's trace.
    let request = find(&spans, "http_request", "POST /orders", SpanId::from(caller.span_id), |s| {
        attribute(s, "path").as_deref() == Some("/orders")
    });
    assert_eq!(request.span_kind, SpanKind::Server);
    assert_eq!(request.span_context.span_id(), SpanId::from(served.span_id), "the response names the server span");
    let mut parent = request;
    let hops = [
        ("OrderStatusChangedToAwaitingValidation", catalog),
        ("OrderStockConfirmed", ordering),
        ("OrderStatusChangedToPaid", catalog),
    ];
    for (event_type, group) in hops {
        let parent_id = parent.span_context.span_id();
        // Enqueued under the span that caused it.
        let publish = find(&spans, "publish", event_type, parent_id, |s| {
            attribute(s, "event_type").as_deref() == Some(event_type)
        });
        assert_eq!(publish.span_kind, SpanKind::Producer);
        let event_id = attribute(publish, "event_id").expect("the producer span names its event");
        let id = publish.span_context.span_id();
        // The relay's send span and the handler's consumer span are children of the producer span.
        let send = find(&spans, "send", event_type, id, |s| attribute(s, "event_id").as_deref() == Some(&event_id));
        assert_eq!(send.span_kind, SpanKind::Producer);
        let consume = find(&spans, "consume", event_type, id, |s| {
            attribute(s, "event_id").as_deref() == Some(&event_id) && attribute(s, "group").as_deref() == Some(group)
        });
        assert_eq!(consume.span_kind, SpanKind::Consumer);
        parent = consume;
    }
    let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    for span in &spans {
        if span.span_context.span_id() != request.span_context.span_id() {
            assert!(
                ids.contains(&span.parent_span_id),
                "{} has a parent outside the trace: {:#?}",
                span.name,
                summary(&spans)
            );
        }
        let values =
            span.attributes.iter().map(|kv| kv.value.as_str().into_owned()).chain(span.events.iter().flat_map(|e| {
                std::iter::once(e.name.to_string()).chain(e.attributes.iter().map(|kv| kv.value.as_str().into_owned()))
            }));
        for value in values {
            assert!(!value.contains("traced-buyer"), "no business data in exported spans ({}): {value}", span.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_across_both_services_in_process() {
    exporter();
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(DemoConfig::on_loopback(dir.path())).await.expect("demo starts");
    one_trace_across_both_services(&demo.client, "catalog", "ordering").await;
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_across_both_services_over_rabbitmq() {
    exporter();
    let exchange = unique("test.traced");
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut urls = Vec::new();
    let mut buses = Vec::new();
    let mut servers = Vec::new();
    let names = [unique("catalog"), unique("ordering")];
    for (service, name) in [Service::Catalog, Service::Ordering].into_iter().zip(&names) {
        let bus = rabbit_bus(|c| c.exchange = exchange.clone()).await;
        let file = dir.path().join(format!("{name}.db"));
        let database = DatabaseUrl::parse(&format!("sqlite://{}", file.display())).unwrap();
        let group = bus_core::GroupName::new(name.as_str()).unwrap();
        let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
        let running = service.start(group, &database, shared, ServiceOptions::default()).await.expect("service starts");
        let listener = listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        urls.push(format!("http://{}", listener.local_addr().unwrap()));
        let stop = stop.clone();
        servers.push(tokio::spawn(running.serve(listener, async move { stop.cancelled().await })));
        buses.push(bus);
    }
    let client = ShopClient::new(urls[0].clone(), urls[1].clone());
    one_trace_across_both_services(&client, &names[0], &names[1]).await;
    stop.cancel();
    for server in servers {
        let _ = server.await;
    }
    for bus in buses {
        bus.shutdown().await;
    }
    delete_topology(&exchange, &[names[0].as_str(), names[1].as_str()]).await;
}
