//! One trace from the producer to the consumer and on to the events the consumer publishes: W3C
//! `traceparent` in the outbox row and on the wire, producer/consumer spans whose parents chain up. Over the
//! in-process bus and over RabbitMQ. Its own binary: it installs its own span recorder as the global subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bus_core::trace::{SpanContext, scope};
use bus_core::{DeliveryContext, EventBus, GroupName, HandlerError, IntegrationEvent, Subscription};
use bus_inproc::InProcBus;
use integration_tests::{TestDb, delete_topology, rabbit_bus, unique, wait_until};
use outbox::{Inbox, InboxConfig, InboxTransaction, Outbox, RelayConfig, SubscriptionInboxExt};
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Recorded = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// Records every span's name and fields.
struct Recorder(Recorded);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}").trim_matches('"').to_owned());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Where a span's fields are in the record (its index), kept in the span's extensions.
struct Slot(usize);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut recorded = self.0.lock().unwrap();
        recorded.push((attrs.metadata().name().to_owned(), fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Slot(recorded.len() - 1));
        }
    }

    /// The framework records the ids once it has them (after the span is opened).
    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(Slot(slot)) = span.extensions().get::<Slot>().map(|s| Slot(s.0)) else { return };
        values.record(&mut Fields(&mut self.0.lock().unwrap()[slot].1));
    }
}

fn recorded() -> Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED
        .get_or_init(|| {
            let recorded = Recorded::default();
            let subscriber = tracing_subscriber::registry().with(Recorder(recorded.clone()));
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this binary");
            recorded
        })
        .clone()
}

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order: String,
}
impl IntegrationEvent for OrderPlaced {
    const TYPE_NAME: &'static str = "TraceOrderPlaced";
}

#[derive(Serialize, Deserialize)]
struct StockReserved {
    order: String,
}
impl IntegrationEvent for StockReserved {
    const TYPE_NAME: &'static str = "TraceStockReserved";
}

/// The span of `kind` ("publish"/"consume") for the event of `event_type` within trace `trace_id`.
fn span(recorded: &Recorded, name: &str, event_type: &str, trace_id: &str) -> HashMap<String, String> {
    let spans = recorded.lock().unwrap();
    let found: Vec<_> = spans
        .iter()
        .filter(|(n, f)| {
            n == name
                && f.get("event_type").map(String::as_str) == Some(event_type)
                && f.get("trace_id").map(String::as_str) == Some(trace_id)
        })
        .map(|(_, f)| f.clone())
        .collect();
    assert!(!found.is_empty(), "no {name} span for {event_type} in trace {trace_id}: {spans:?}");
    found[0].clone()
}

async fn one_trace_through(bus: Arc<dyn EventBus>, groups: (&str, &str)) {
    let recorded = recorded();
    let fixture = sqlx::Sqlite::fixture().await;
    let outbox = Outbox::new(fixture.pool.clone(), fixture.outbox_config("traced")).unwrap();
    outbox.migrate().await.unwrap();
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &bus_core::RetryPolicy::default()).unwrap();
    let reserve = |event: OrderPlaced, mut tx: InboxTransaction<sqlx::Sqlite>| async move {
        tx.enqueue(&StockReserved { order: event.order }).await?;
        Ok::<(), HandlerError>(())
    };
    let first =
        bus.subscribe(Subscription::new(GroupName::new(groups.0).unwrap()).on_inbox(&inbox, reserve)).await.unwrap();
    let seen: Arc<Mutex<Option<String>>> = Arc::default();
    let sink = seen.clone();
    let second = bus
        .subscribe(Subscription::new(GroupName::new(groups.1).unwrap()).on(
            move |_e: StockReserved, ctx: DeliveryContext| {
                let sink = sink.clone();
                async move {
                    *sink.lock().unwrap() = ctx.envelope().trace().traceparent().map(str::to_owned);
                    Ok::<(), HandlerError>(())
                }
            },
        ))
        .await
        .unwrap();
    let relay = outbox.relay(bus.clone(), RelayConfig::default()).unwrap().spawn();

    let root = SpanContext::root();
    scope(root, async {
        let mut tx = outbox.begin().await.unwrap();
        tx.enqueue(&OrderPlaced { order: "o-1".into() }).await.unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    wait_until("the caused event is handled", Duration::from_secs(20), || async { seen.lock().unwrap().is_some() })
        .await;

    let trace_id = root.trace_id_hex();
    let publish_a = span(&recorded, "publish", "TraceOrderPlaced", &trace_id);
    let consume_a = span(&recorded, "consume", "TraceOrderPlaced", &trace_id);
    let publish_b = span(&recorded, "publish", "TraceStockReserved", &trace_id);
    let consume_b = span(&recorded, "consume", "TraceStockReserved", &trace_id);
    assert_eq!(publish_a["parent_span_id"], root.span_id_hex(), "the producer span is a child of the request");
    assert_eq!(consume_a["parent_span_id"], publish_a["span_id"], "the consumer span's parent is the producer's");
    let send_a = span(&recorded, "send", "TraceOrderPlaced", &trace_id);
    assert_eq!(send_a["parent_span_id"], publish_a["span_id"], "the relay's send span is the producer's child");
    assert_eq!(send_a["event_id"], publish_a["event_id"]);
    assert_eq!(publish_b["parent_span_id"], consume_a["span_id"], "events a handler publishes are its children");
    assert_eq!(consume_b["parent_span_id"], publish_b["span_id"]);
    assert_eq!((publish_a["otel.kind"].as_str(), consume_a["otel.kind"].as_str()), ("producer", "consumer"));
    assert_eq!(consume_a["group"], groups.0);
    let on_the_wire = SpanContext::parse(seen.lock().unwrap().as_deref().unwrap()).unwrap();
    assert_eq!(on_the_wire.span_id_hex(), publish_b["span_id"], "the delivered traceparent is the producer span");
    for fields in [&publish_a, &consume_a] {
        assert!(fields.values().all(|v| !v.contains("o-1")), "no payload in spans: {fields:?}");
    }
    relay.shutdown().await;
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_producer_to_consumer_and_on_in_process() {
    recorded();
    let bus = InProcBus::new();
    one_trace_through(Arc::new(bus.clone()), ("stock", "shipping")).await;
    bus.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_producer_to_consumer_and_on_over_rabbitmq() {
    // Before anything that sets up the harness's log subscriber: this binary's global one records spans.
    recorded();
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let (first, second) = (unique("stock"), unique("shipping"));
    one_trace_through(Arc::new(bus.clone()), (&first, &second)).await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&first, &second]).await;
}
