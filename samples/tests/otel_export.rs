//! The service binaries with `OTEL_EXPORTER_OTLP_ENDPOINT` set: their spans reach an OTLP/HTTP receiver (here a
//! small one in the test) as protobuf, flushed when the service stops on SIGTERM; a bad endpoint
//! stops the service at start-up with a message naming the variable, never its value.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use integration_tests::shop::ServiceProcess;
use integration_tests::{amqp_url, delete_topology, unique, wait_until};

type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An OTLP/HTTP traces receiver: keeps each request's content type and body.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let content_type =
                    headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                sink.lock().unwrap().push((content_type, body));
                // An empty ExportTraceServiceResponse.
                ([("content-type", "application/x-protobuf")], Bytes::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exports_its_spans_over_otlp_and_flushes_them_when_it_stops() {
    let (endpoint, received) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (name, exchange) = (unique("traced-catalog"), unique("test.otlp"));
    let env = vec![
        ("SERVICE_NAME".to_owned(), name.clone()),
        ("DATABASE_URL".to_owned(), format!("sqlite://{}", dir.path().join("catalog.db").display())),
        ("AMQP_URL".to_owned(), amqp_url().await),
        ("BUS_EXCHANGE".to_owned(), exchange.clone()),
        ("HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint),
        // No export on the batch timer: only the flush at the stop can deliver.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "3600000".to_owned()),
    ];
    let mut catalog = ServiceProcess::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_catalog")), &[], &env).await;
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/items", catalog.url))
        .json(&serde_json::json!({ "name": "Traced Mug", "price_cents": 100, "stock": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{:?}", created.text().await);
    // No consumer group takes ProductCreated here: the relay's publish is refused as unroutable, which its send
    // span records as an error.
    let metrics = format!("{}/metrics", catalog.url);
    wait_until("the relay tried to publish", Duration::from_secs(20), || async {
        let text = http.get(&metrics).send().await.unwrap().text().await.unwrap();
        samples::client::metric_value(&text, "bus_publish_failures_total").unwrap_or_default() >= 1.0
    })
    .await;
    assert!(received.lock().unwrap().is_empty(), "nothing exported before the stop (batch timer off)");
    assert!(catalog.terminate(Duration::from_secs(20)).await, "the service stops on SIGTERM");
    wait_until("the spans reached the receiver", Duration::from_secs(10), || async {
        received.lock().unwrap().iter().any(|(_, body)| contains(body, b"http_request"))
    })
    .await;
    delete_topology(&exchange, &[name.as_str()]).await;
    let received = received.lock().unwrap();
    for (content_type, _) in received.iter() {
        assert_eq!(content_type, "application/x-protobuf", "OTLP over HTTP/protobuf");
    }
    let all: Vec<u8> = received.iter().flat_map(|(_, body)| body.to_vec()).collect();
    for expected in [&b"http_request"[..], b"publish", b"send", b"ProductCreated", b"unroutable", name.as_bytes()] {
        assert!(contains(&all, expected), "exported: {}", String::from_utf8_lossy(expected));
    }
}

#[tokio::test]
async fn a_bad_otlp_endpoint_stops_the_service_naming_the_variable() {
    for (endpoint, says) in [
        ("https://collector.example:4318", "plain http://"),
        ("http://user:s3cret@collector.example:4318", "credentials"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ordering"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("s3cret"), "the value is never echoed: {stderr}");
    }
}
