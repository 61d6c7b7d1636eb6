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

/// The consistent-hash exchange that spreads a partitioned group's events over its partitions.
pub(crate) fn partition_exchange(group: &GroupName) -> String {
    format!("{group}.partitions")
}

/// The queue of partition `index` of a partitioned group: `<group>.p007`. Three digits whatever the count, so
/// that the names sort in partition order: RabbitMQ rebuilds the hash ring after a restart from the bindings in
/// name order, and only this keeps every key on its partition across broker restarts.
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

/// The exchange type of the `rabbitmq_consistent_hash_exchange` plugin.
const CONSISTENT_HASH: &str = "x-consistent-hash";

/// Declares a partitioned group: `<group>.partitions` (consistent hash on the `x-partition-key` header) bound to
/// the bus exchange for each handled event type; `partitions` queues `<group>.pNNN` with a single active
/// consumer, bound to it with equal weight, in name order; and `<group>.dlq` (a partitioned group retries in
/// place, so it has no retry queue). Refuses a group that was declared with another partition count (the mapping of
/// keys to partitions would change under queued events; with fewer, the extra partitions would keep taking
/// events nobody consumes) and a broker without the plugin, naming the setting.
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
    let mut marker = FieldTable::default();
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
    let exchange = partition_exchange(group);
    let mut hash = FieldTable::default();
    hash.insert("hash-header".into(), text(crate::wire::H_PARTITION_KEY));
    let declared = channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            hash,
        )
        .await;
    if let Err(error) = declared {
        // 503 COMMAND_INVALID "invalid exchange type": the plugin is not enabled.
        if error.to_string().contains(CONSISTENT_HASH) || error.to_string().contains("exchange type") {
            return Err(BusError::invalid_config(
                "partitions",
                "need the RabbitMQ plugin rabbitmq_consistent_hash_exchange, which ships with RabbitMQ: \
                 rabbitmq-plugins enable rabbitmq_consistent_hash_exchange",
            ));
        }
        return Err(transport(error));
    }
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
    for index in 0..partitions {
        let queue = partition_queue(group, index);
        let mut args = arguments(config);
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        channel.queue_declare(queue.as_str().into(), durable, args).await.map_err(transport)?;
        // Weight 1 each: equal shares. Re-binding is a no-op, so the ring never changes once built.
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
    }
    channel
        .queue_declare(dead_letter_queue(group).as_str().into(), durable, arguments(config))
        .await
        .map_err(transport)?;
    Ok(())
}

/// True if `group` is partitioned on the broker (its `<group>.partitions` exchange exists).
pub(crate) async fn is_partitioned(connection: &lapin::Connection, group: &GroupName) -> Result<bool, bus_core::BusError> {
    use lapin::ExchangeKind;
    use lapin::options::ExchangeDeclareOptions;
    let channel = connection.create_channel().await.map_err(crate::link::transport)?;
    let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    let exists = channel
        .exchange_declare(
            partition_exchange(group).as_str().into(),
            ExchangeKind::Custom(CONSISTENT_HASH.into()),
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
    fn partition_queues_sort_in_partition_order() {
        let group = GroupName::new("catalog").unwrap();
        let names: Vec<String> = (0..bus_core::MAX_PARTITIONS).map(|i| partition_queue(&group, i)).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(partition_queue(&group, 7), "catalog.p007");
    }
}
