//! The monitoring kit in `docs/monitoring/`: the Prometheus alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`), and the Grafana dashboard and the rules use only metrics a service really
//! exports, while the dashboard shows every one of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bus_core::{DeliveryContext, EventBus, GroupName, RetryPolicy, Subscription};
use bus_inproc::InProcBus;
use integration_tests::{Numbered, TestDb, fast_relay};
use outbox::{Inbox, InboxConfig, ServiceMetrics};

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

/// The `bus_…` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("bus_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// What a service built on the framework exports: a relay, an inbox and a subscription, rendered.
async fn exported() -> BTreeSet<String> {
    let fixture = sqlx::Sqlite::fixture().await;
    let outbox = integration_tests::migrated_outbox(&fixture).await;
    let bus = InProcBus::new();
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &RetryPolicy::default()).unwrap();
    let subscription = bus
        .subscribe(
            Subscription::new(GroupName::from_static("consumer"))
                .on::<Numbered, _>(|_e: Numbered, _ctx: DeliveryContext| async { Ok(()) }),
        )
        .await
        .unwrap();
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    let text = ServiceMetrics::new(&outbox)
        .relay(relay.monitor())
        .inbox(&inbox)
        .subscription(&subscription)
        .render()
        .await
        .unwrap();
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
    text.lines().filter(|l| !l.starts_with('#')).flat_map(metric_names).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_the_metrics_services_export() {
    let exported = exported().await;
    assert!(exported.contains("bus_outbox_parked_keys") && exported.contains("bus_published_total"), "{exported:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap())
            .expect("dashboard.json is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(!exprs.is_empty(), "the dashboard queries something");
    let shown: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let unknown: Vec<_> = shown.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics no service exports: {unknown:?}");
    let missing: Vec<_> = exported.difference(&shown).collect();
    assert!(missing.is_empty(), "exported metrics the dashboard does not show: {missing:?}");

    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).unwrap();
    let alerted = metric_names(&rules);
    let unknown: Vec<_> = alerted.difference(&exported).collect();
    assert!(unknown.is_empty(), "the alert rules use metrics no service exports: {unknown:?}");
    for needed in
        ["bus_outbox_oldest_pending_seconds", "bus_outbox_failed", "bus_outbox_parked_keys", "bus_dead_lettered_total"]
    {
        assert!(alerted.contains(needed), "an alert on {needed}");
    }
}

#[test]
fn the_alert_rules_pass_promtool() {
    let Ok(version) = std::process::Command::new("promtool").arg("--version").output() else {
        let message = "promtool is not installed (Debian package prometheus): the alert rules were not checked";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("NOT RUN: {message}");
        return;
    };
    assert!(version.status.success());
    for args in [&["check", "rules", "alerts.yml"][..], &["test", "rules", "alerts.test.yml"][..]] {
        let output = std::process::Command::new("promtool").args(args).current_dir(monitoring()).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
