//! Declaring a consumer group's queues: `<group>` bound to each handled event type, `<group>.retry` (per-message
//! TTL, dead-lettered back to `<group>`) and `<group>.dlq`. Declared at every (re)connect; declarations are
//! idempotent.

use std::collections::BTreeSet;

use bus_core::{EventTypeName, GroupName};
use lapin::Channel;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::config::RabbitConfig;

pub(crate) fn retry_queue(group: &GroupName) -> String {
    format!("{group}.retry")
}

pub(crate) fn dead_letter_queue(group: &GroupName) -> String {
    format!("{group}.dlq")
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn arguments(config: &RabbitConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text(config.queue_type.as_str()));
    args
}

pub(crate) async fn declare_group(
    channel: &Channel,
    config: &RabbitConfig,
    group: &GroupName,
    event_types: &BTreeSet<EventTypeName>,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(group.as_str().into(), durable, arguments(config)).await?;
    for event_type in event_types {
        channel
            .queue_bind(
                group.as_str().into(),
                config.exchange.as_str().into(),
                event_type.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut retry = arguments(config);
    retry.insert("x-dead-letter-exchange".into(), text(""));
    retry.insert("x-dead-letter-routing-key".into(), text(group.as_str()));
    channel.queue_declare(retry_queue(group).as_str().into(), durable, retry).await?;
    channel.queue_declare(dead_letter_queue(group).as_str().into(), durable, arguments(config)).await?;
    Ok(())
}
