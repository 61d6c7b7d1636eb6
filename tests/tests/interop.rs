//! Another language on the same bus: `docs/examples/interop.py` (Python, pika) publishes an event that a Rust
//! service consumes, and consumes an event that a Rust service publishes, from CONTRACT §1 alone.
//! Needs `python3` with `pika` (`pip install pika==1.3.2`; `.ci/run` installs it).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::{DeliveryContext, Envelope, EventBus, GroupName, HandlerError, IntegrationEvent, Subscription};
use integration_tests::{amqp_url, delete_topology, rabbit_bus, unique, wait_until};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct OrderShipped {
    order_id: String,
    carrier: String,
}

impl IntegrationEvent for OrderShipped {
    const TYPE_NAME: &'static str = "OrderShipped";
    fn partition_key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

fn script() -> String {
    format!("{}/../docs/examples/interop.py", env!("CARGO_MANIFEST_DIR"))
}

fn python() -> tokio::process::Command {
    let check = std::process::Command::new("python3").args(["-c", "import pika"]).output();
    assert!(
        check.is_ok_and(|o| o.status.success()),
        "this test runs docs/examples/interop.py: it needs python3 with pika (pip install pika==1.3.2)"
    );
    let mut command = tokio::process::Command::new("python3");
    command.arg(script()).kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_service_publishes_to_and_consumes_from_a_rust_service() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let (rust_group, python_queue) = (unique("rust-shipping"), unique("python-invoicing"));
    let url = amqp_url().await;

    // Python → Rust.
    let received: Arc<Mutex<Vec<(OrderShipped, Envelope)>>> = Arc::default();
    let sink = received.clone();
    let consumer = bus
        .subscribe(Subscription::new(GroupName::new(&rust_group).unwrap()).on(
            move |event: OrderShipped, ctx: DeliveryContext| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push((event, ctx.envelope().clone()));
                    Ok::<(), HandlerError>(())
                }
            },
        ))
        .await
        .unwrap();
    let published = python()
        .args(["publish", "--url", &url, "--exchange", &exchange, "--type", "OrderShipped"])
        .args([
            "--payload",
            r#"{"order_id": "o-17", "carrier": "DHL"}"#,
            "--partition-key",
            "o-17",
            "--source",
            "py-shipping",
        ])
        .output()
        .await
        .expect("run python");
    assert!(published.status.success(), "python publish: {}", String::from_utf8_lossy(&published.stderr));
    let event_id = String::from_utf8_lossy(&published.stdout).trim().to_owned();
    wait_until("the Rust service got the Python event", Duration::from_secs(10), || async {
        !received.lock().unwrap().is_empty()
    })
    .await;
    let (event, envelope) = received.lock().unwrap()[0].clone();
    assert_eq!(event, OrderShipped { order_id: "o-17".into(), carrier: "DHL".into() });
    assert_eq!(envelope.id().to_string(), event_id);
    assert_eq!(envelope.partition_key(), Some("o-17"));
    assert_eq!(envelope.source(), Some("py-shipping"));
    assert_eq!(envelope.version(), 1);

    // Rust → Python.
    let mut consumer_py = python()
        .args(["consume", "--url", &url, "--exchange", &exchange, "--queue", &python_queue, "--type", "OrderShipped"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    let mut lines = BufReader::new(consumer_py.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"));
    let sent = OrderShipped { order_id: "o-18".into(), carrier: "UPS".into() };
    let envelope = Envelope::for_event(&sent).unwrap().source("rust-shipping").build().unwrap();
    let sent_id = envelope.id();
    bus.publish_confirmed(envelope).await.unwrap();
    let line =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().expect("a line");
    let got: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got["id"], sent_id.to_string());
    assert_eq!(got["type"], "OrderShipped");
    assert_eq!(got["content_type"], "application/json");
    assert_eq!(got["delivery_mode"], 2);
    assert_eq!(got["source"], "rust-shipping");
    assert_eq!(got["version"], 1);
    assert_eq!(got["partition_key"], "o-18");
    assert!(got["occurred_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{got}");
    assert_eq!(got["payload"], serde_json::json!({"order_id": "o-18", "carrier": "UPS"}));
    assert!(consumer_py.wait().await.unwrap().success());

    consumer.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&rust_group, &python_queue]).await;
}
