//! Declaring a consumer group's queues: `<group>` bound to each handled event type, `<group>.retry` (per-message
//! TTL, dead-lettered back to `<group>`) and `<group>.dlq`. Declared at every (re)connect; declarations are
//! idempotent. The event types a group is bound to are recorded in `<group>.bindings` (one message: each type
//! with when an instance last bound it), so that a type no instance handles any more is unbound instead of
//! dead-lettering forever (and hiding that nobody handles it); see [`unbind_stale`].

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

/// On quorum queues: dead-letter at least once (a message expiring or over its limit is moved only once the
/// target has it; RabbitMQ requires `x-overflow=reject-publish` for that) to `target` (a queue, through the
/// default exchange).
fn dead_letter_at_least_once(args: &mut FieldTable, target: &str) {
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(target));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
}

/// A consumed queue (the group's queue, a partition): on quorum queues, an explicit delivery limit (RabbitMQ
/// 4.x defaults it to 20 and counts every return, hand-overs included) above the consumer's own
/// `redelivery_limit`, which dead-letters first with a reason; past it the broker dead-letters to
/// `<group>.dlq` (at least once) instead of dropping the message.
fn consumed_queue_arguments(config: &RabbitConfig, group: &GroupName) -> FieldTable {
    let mut args = arguments(config);
    if config.queue_type == crate::config::QueueType::Quorum {
        let limit = i64::from(config.redelivery_limit).saturating_add(QUORUM_DELIVERY_LIMIT_MARGIN);
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        dead_letter_at_least_once(&mut args, &dead_letter_queue(group));
    }
    args
}

/// How far above `redelivery_limit` the broker's own `x-delivery-limit` of a quorum queue is set.
const QUORUM_DELIVERY_LIMIT_MARGIN: i64 = 5;

/// `<group>.dlq`: on quorum queues, a delivery limit high enough that listing the dead letters (which takes and
/// returns them) never drops one (RabbitMQ 4.x would after 20 listings by default).
fn dead_letter_queue_arguments(config: &RabbitConfig) -> FieldTable {
    let mut args = arguments(config);
    if config.queue_type == crate::config::QueueType::Quorum {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1_000_000_000));
    }
    args
}

pub(crate) async fn declare_group(
    channel: &Channel,
    config: &RabbitConfig,
    group: &GroupName,
    event_types: &BTreeSet<EventTypeName>,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(group.as_str().into(), durable, consumed_queue_arguments(config, group)).await?;
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
    if config.queue_type == crate::config::QueueType::Quorum {
        // A retry that expires while the group queue's leader is away must wait, not be dropped.
        dead_letter_at_least_once(&mut retry, group.as_str());
    }
    channel.queue_declare(retry_queue(group).as_str().into(), durable, retry).await?;
    channel
        .queue_declare(dead_letter_queue(group).as_str().into(), durable, dead_letter_queue_arguments(config))
        .await?;
    Ok(())
}

/// The queue that records which event types a group's queue (or partition exchange) is bound to.
pub(crate) fn bindings_record(group: &GroupName) -> String {
    format!("{group}.bindings")
}

/// Unbinds from `group` the event types no instance has bound for `grace` (as `<group>.bindings` records:
/// each type with when an instance last bound it), and records `event_types` as bound now. Every instance runs
/// it when it starts consuming and then every `grace / 3`, so a type that a live instance handles (an old
/// version during a rolling deploy, a canary that added a handler) stays fresh and bound; a type whose last
/// handler was removed is unbound about `grace` after the last instance handling it stopped. The new record is
/// confirmed before the old one is removed; several instances writing at once may leave several records: they
/// are read together. Run on a channel of its own (it is put in confirm mode).
pub(crate) async fn unbind_stale(
    channel: &Channel,
    config: &RabbitConfig,
    group: &GroupName,
    event_types: &BTreeSet<EventTypeName>,
    partitioned: bool,
) -> Result<(), lapin::Error> {
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeUnbindOptions,
    };
    let record = bindings_record(group);
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(record.as_str().into(), durable, arguments(config)).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut bound: std::collections::BTreeMap<EventTypeName, i64> = std::collections::BTreeMap::new();
    let mut last_tag = None;
    for _ in 0..64 {
        let Some(message) = channel.basic_get(record.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
            break;
        };
        for line in String::from_utf8_lossy(&message.delivery.data).lines() {
            let (name, at) = line.split_once('\t').unwrap_or((line, "0"));
            if let Ok(name) = EventTypeName::new(name) {
                let at = at.parse::<i64>().unwrap_or(0);
                let entry = bound.entry(name).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
        last_tag = Some(message.delivery.delivery_tag);
    }
    for event_type in event_types {
        bound.insert(event_type.clone(), now);
    }
    let grace = i64::try_from(config.stale_binding_grace.as_millis()).unwrap_or(i64::MAX);
    let stale: Vec<EventTypeName> =
        bound.iter().filter(|(_, at)| now.saturating_sub(**at) > grace).map(|(name, _)| name.clone()).collect();
    for stale in stale {
        tracing::info!(%group, event_type = %stale, "no instance has handled this event type for a while: unbinding it");
        if partitioned {
            channel
                .exchange_unbind(
                    partition_exchange(group).as_str().into(),
                    config.exchange.as_str().into(),
                    stale.as_str().into(),
                    ExchangeUnbindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        } else {
            channel
                .queue_unbind(
                    group.as_str().into(),
                    config.exchange.as_str().into(),
                    stale.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        bound.remove(&stale);
    }
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = bound.iter().map(|(name, at)| format!("{name}\t{at}")).collect::<Vec<_>>().join("\n").into_bytes();
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    let confirm = channel
        .basic_publish("".into(), record.as_str().into(), BasicPublishOptions::default(), &body, properties)
        .await?
        .await?;
    if let Some(tag) = last_tag.filter(|_| confirm.is_ack()) {
        channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// The headers exchange that spreads a partitioned group's events over its partitions by `partition-bucket`.
pub(crate) fn partition_exchange(group: &GroupName) -> String {
    format!("{group}.partitions")
}

/// The alternate exchange of [`partition_exchange`]: takes the events without a `partition-bucket` header (no
/// partition key, or a publisher that does not set it) to partition 0, so that none is lost.
fn unbucketed_exchange(group: &GroupName) -> String {
    format!("{group}.partitions.unbucketed")
}

/// The queue of partition `index` of a partitioned group: `<group>.p007`.
pub(crate) fn partition_queue(group: &GroupName, index: u16) -> String {
    format!("{group}.p{index:03}")
}

/// The queue that records a partitioned group's partition count (as its `x-max-length`; it holds no message).
pub(crate) fn partition_count_marker(group: &GroupName) -> String {
    format!("{group}.partition-count")
}

/// The fanout exchange a partitioned group's instances announce themselves on.
pub(crate) fn membership_exchange(group: &GroupName) -> String {
    format!("{group}.members")
}

/// Declares a partitioned group: `<group>.partitions`, a headers exchange bound to the bus exchange for each
/// handled event type, routing bucket `b` (the `partition-bucket` header) to partition `b mod partitions`;
/// `partitions` queues `<group>.pNNN` with a single active consumer; `<group>.partitions.unbucketed`, its
/// alternate exchange, to partition 0; and `<group>.dlq` (a partitioned group retries in place, so it has no
/// retry queue). The mapping depends on nothing but the key and the count, so it survives broker restarts.
/// Refuses a group that was declared with another partition count (the keys would move between partitions under
/// queued events; with fewer, the extra partitions would keep taking events nobody consumes), naming the
/// setting.
pub(crate) async fn declare_partitioned_group(
    channel: &Channel,
    config: &RabbitConfig,
    group: &GroupName,
    event_types: &BTreeSet<EventTypeName>,
    partitions: u16,
) -> Result<(), bus_core::BusError> {
    use crate::link::transport;
    use bus_core::BusError;
    use lapin::ExchangeKind;
    use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions};

    // The count is recorded in a marker queue's x-max-length (the queue is bound to nothing and never holds a
    // message): RabbitMQ refuses to re-declare it with another value, which is the check, race-free and silent
    // when the count matches.
    // A quorum marker on a cluster: a classic queue lives on one node, and the group could not start while that
    // node is down.
    let mut marker =
        if config.queue_type == crate::config::QueueType::Quorum { arguments(config) } else { FieldTable::default() };
    marker.insert("x-max-length".into(), AMQPValue::LongLongInt(i64::from(partitions)));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    if let Err(error) = channel.queue_declare(partition_count_marker(group).as_str().into(), durable, marker).await {
        if error.to_string().contains("PRECONDITION_FAILED") {
            return Err(BusError::invalid_config(
                "partitions",
                format!(
                    "group {group} was declared on the broker with another partition count than {partitions} \
                     (queue {} records it as its x-max-length); the count is fixed for the life of a group: drain \
                     and delete the group's partition queues and that queue to change it",
                    partition_count_marker(group)
                ),
            ));
        }
        return Err(transport(error));
    }
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let (exchange, unbucketed) = (partition_exchange(group), unbucketed_exchange(group));
    channel
        .exchange_declare(unbucketed.as_str().into(), ExchangeKind::Fanout, durable_exchange, FieldTable::default())
        .await
        .map_err(transport)?;
    let mut alternate = FieldTable::default();
    alternate.insert("alternate-exchange".into(), text(&unbucketed));
    channel
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Headers, durable_exchange, alternate)
        .await
        .map_err(transport)?;
    for index in 0..partitions {
        let mut args = consumed_queue_arguments(config, group);
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        channel.queue_declare(partition_queue(group, index).as_str().into(), durable, args).await.map_err(transport)?;
    }
    let first = partition_queue(group, 0);
    channel
        .queue_bind(
            first.as_str().into(),
            unbucketed.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(transport)?;
    for bucket in 0..crate::wire::PARTITION_BUCKETS {
        let mut matches = FieldTable::default();
        matches.insert("x-match".into(), text("all"));
        matches.insert(crate::wire::H_PARTITION_BUCKET.into(), text(&bucket.to_string()));
        channel
            .queue_bind(
                partition_queue(group, bucket % partitions).as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                matches,
            )
            .await
            .map_err(transport)?;
    }
    // Bound last: no event reaches the partitions before every bucket has its partition.
    for event_type in event_types {
        channel
            .exchange_bind(
                exchange.as_str().into(),
                config.exchange.as_str().into(),
                event_type.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
    }
    channel
        .queue_declare(dead_letter_queue(group).as_str().into(), durable, dead_letter_queue_arguments(config))
        .await
        .map_err(transport)?;
    Ok(())
}

/// True if `group` is partitioned on the broker (its `<group>.partitions` exchange exists; a passive declare, on
/// a channel of its own, as a miss closes the channel).
pub(crate) async fn is_partitioned(
    connection: &lapin::Connection,
    group: &GroupName,
) -> Result<bool, bus_core::BusError> {
    use lapin::ExchangeKind;
    use lapin::options::ExchangeDeclareOptions;
    let channel = connection.create_channel().await.map_err(crate::link::transport)?;
    let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    let exists = channel
        .exchange_declare(
            partition_exchange(group).as_str().into(),
            ExchangeKind::Headers,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok();
    if exists {
        let _ = channel.close(200, "OK".into()).await;
    }
    Ok(exists)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names() {
        let group = GroupName::new("catalog").unwrap();
        assert_eq!(partition_queue(&group, 7), "catalog.p007");
        assert_eq!(partition_exchange(&group), "catalog.partitions");
        // The longest group name still gives valid AMQP names (at most 255 bytes).
        let longest = GroupName::new("g".repeat(bus_core::MAX_NAME_LEN)).unwrap();
        for name in [unbucketed_exchange(&longest), partition_count_marker(&longest), partition_queue(&longest, 63)] {
            assert!(name.len() <= 255, "{name}");
        }
    }
}
