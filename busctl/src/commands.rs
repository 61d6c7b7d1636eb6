//! The commands.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bus_core::{DeadLetterQueue, EventTypeName};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::output::{emit, table};
use crate::target::{AnyOutbox, broker, group};
use crate::{Command, DlqCommand, Global, InboxCommand, OutboxCommand};

/// Events read from the outbox per replay page.
const REPLAY_PAGE: i64 = 500;

pub async fn run(global: Global, command: Command) -> Result<()> {
    match command {
        Command::Outbox(command) => outbox(&global, command).await,
        Command::Inbox(InboxCommand::Forget { queue, event_type }) => {
            let outbox = AnyOutbox::connect(&global).await?;
            let event_type = EventTypeName::new(&event_type).map_err(|e| anyhow!("--type: {e}"))?;
            let forgotten = outbox.forget_handled(&group(&queue)?, &event_type).await?;
            emit(global.json, json!({ "queue": queue, "type": event_type.as_str(), "forgotten": forgotten }), || {
                println!("{queue} will handle {forgotten} replayed {event_type} events again");
            });
            Ok(())
        }
        Command::Dlq(command) => dlq(&global, command).await,
        Command::Replay { queue, from_seq, since, to_seq, event_type } => {
            let from = match since {
                None => from_seq,
                Some(since) => match AnyOutbox::connect(&global).await?.seq_before(since).await? {
                    Some(from) => from,
                    None => {
                        emit(global.json, json!({ "queue": queue, "replayed": 0, "last_seq": null }), || {
                            println!("no retained event was enqueued since {since}");
                        });
                        return Ok(());
                    }
                },
            };
            replay(&global, &queue, from, to_seq.unwrap_or(i64::MAX), event_type.as_deref()).await
        }
    }
}

async fn outbox(global: &Global, command: OutboxCommand) -> Result<()> {
    let outbox = AnyOutbox::connect(global).await?;
    match command {
        OutboxCommand::Status => {
            let s = outbox.status().await?;
            let oldest = s.oldest_pending_ms.map(|ms| ms as f64 / 1000.0);
            let value = json!({
                "pending": s.pending, "in_flight": s.in_flight, "failed": s.failed, "published": s.published,
                "oldest_pending_seconds": oldest, "parked_keys": s.parked_keys, "scheduled": s.scheduled,
            });
            emit(global.json, value, || {
                table(
                    &[
                        "pending",
                        "in flight",
                        "scheduled",
                        "failed",
                        "parked keys",
                        "published (retained)",
                        "oldest pending",
                    ],
                    &[vec![
                        s.pending.to_string(),
                        s.in_flight.to_string(),
                        s.scheduled.to_string(),
                        s.failed.to_string(),
                        s.parked_keys.to_string(),
                        s.published.to_string(),
                        oldest.map_or_else(|| "-".to_owned(), |o| format!("{o:.1} s")),
                    ]],
                );
            });
        }
        OutboxCommand::Failed { limit } => {
            let failed = outbox.failed(limit).await?;
            let value = json!(
                failed
                    .iter()
                    .map(|f| json!({
                        "seq": f.seq, "event_id": f.event_id, "type": f.event_type, "attempts": f.attempts,
                        "partition_key": f.partition_key, "last_error": f.last_error,
                    }))
                    .collect::<Vec<_>>()
            );
            emit(global.json, value, || {
                let rows: Vec<Vec<String>> = failed
                    .iter()
                    .map(|f| {
                        vec![
                            f.seq.to_string(),
                            f.event_id.to_string(),
                            f.event_type.clone(),
                            f.attempts.to_string(),
                            f.last_error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(&["seq", "event id", "type", "attempts", "last error"], &rows);
            });
        }
        OutboxCommand::Retry { id, all } => {
            if id.is_none() && !all {
                bail!("give --id ID or --all");
            }
            let requeued = outbox.retry_failed(id).await?;
            if let (Some(id), 0) = (id, requeued) {
                bail!("no failed event {id}");
            }
            emit(global.json, json!({ "requeued": requeued }), || println!("{requeued} events re-queued"));
        }
    }
    Ok(())
}

async fn dlq(global: &Global, command: DlqCommand) -> Result<()> {
    let bus = broker(global).await?;
    let result = async {
        match command {
            DlqCommand::List { queue } => {
                let letters = bus.dead_letters(&group(&queue)?).await?;
                let value =
                    json!(letters
                    .iter()
                    .map(|l| json!({
                        "message_id": l.message_id, "type": l.envelope.as_ref().map(|e| e.event_type().as_str()),
                        "attempts": l.attempts, "cause": l.cause.as_str(),
                        "reason": l.last_error, "failed_at": l.failed_at.to_rfc3339(), "bytes": l.payload.len(),
                    }))
                    .collect::<Vec<_>>());
                emit(global.json, value, || {
                    let rows: Vec<Vec<String>> = letters
                        .iter()
                        .map(|l| {
                            vec![
                                l.message_id.clone().unwrap_or_else(|| "(none)".into()),
                                l.envelope.as_ref().map_or("(unreadable)".into(), |e| e.event_type().to_string()),
                                l.attempts.to_string(),
                                l.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                l.last_error.clone(),
                            ]
                        })
                        .collect();
                    table(&["message id", "type", "attempts", "failed at", "reason"], &rows);
                });
            }
            DlqCommand::Redrive { queue, id } => {
                let redriven = bus.redrive(&group(&queue)?, id).await?;
                if let (Some(id), 0) = (id, redriven) {
                    bail!("no dead letter {id} in {queue}.dlq");
                }
                emit(global.json, json!({ "redriven": redriven }), || println!("{redriven} dead letters redriven"));
            }
        }
        Ok(())
    }
    .await;
    bus.shutdown().await;
    result
}

async fn replay(global: &Global, queue: &str, from: i64, to: i64, event_type: Option<&str>) -> Result<()> {
    if let Some(t) = event_type {
        EventTypeName::new(t).map_err(|e| anyhow!("--type: {e}"))?;
    }
    if to <= from {
        bail!("--to-seq must be above --from-seq");
    }
    let group = group(queue)?;
    let outbox = AnyOutbox::connect(global).await?;
    let bus = broker(global).await?;
    let progress = if global.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    };
    let result = async {
        let (mut after, mut replayed, mut last_seq) = (from, 0u64, None);
        loop {
            let page = outbox.published_events(after, to, event_type, REPLAY_PAGE).await?;
            let Some((seq, _)) = page.last() else { break };
            let next = *seq;
            // The whole page in flight at once, then every confirmation: order is kept (one channel, in order).
            let mut confirmations = Vec::with_capacity(page.len());
            for (seq, envelope) in page {
                let confirmation =
                    bus.publish_to_group(&group, envelope).await.with_context(|| format!("event seq {seq}"))?;
                confirmations.push((seq, confirmation));
            }
            for (seq, confirmation) in confirmations {
                confirmation.await.with_context(|| format!("event seq {seq} was not confirmed by the broker"))?;
                replayed += 1;
            }
            after = next;
            last_seq = Some(next);
            progress.set_message(format!("{replayed} events replayed to {queue} (up to seq {next})"));
        }
        Ok::<_, anyhow::Error>((replayed, last_seq))
    }
    .await;
    progress.finish_and_clear();
    bus.shutdown().await;
    let (replayed, last_seq) = result?;
    emit(global.json, json!({ "queue": queue, "replayed": replayed, "last_seq": last_seq }), || {
        println!(
            "{replayed} events replayed to {queue}{}",
            last_seq.map(|s| format!(" (last seq {s})")).unwrap_or_default()
        );
    });
    Ok(())
}
