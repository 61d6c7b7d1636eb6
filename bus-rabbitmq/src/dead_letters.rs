//! Listing and redriving `<group>.dlq`.
//!
//! Listing takes the oldest [`MAX_LISTED_DEAD_LETTERS`] messages without acknowledging them and closes the channel, which
//! returns them all to the queue. Redriving goes through the queue one message at a time (memory stays flat
//! however long it is), up to the messages it held when the redrive began, and publishes each back to `<group>` (attempts from 1, broker-confirmed) before removing it
//! from the dead-letter queue: a failure in between leaves a copy in both, never in neither. For a partitioned
//! group it goes back through `<group>.partitions`, to the partition of its key.

use bus_core::{BusError, DeadLetter, DeadLetterCause, GroupName};
use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use uuid::Uuid;

use crate::confirms::ConfirmedChannel;
use crate::link::{Session, transport};
use crate::side_publish::confirmed_publish_to;
use crate::topology;
use crate::wire;

/// At most this many dead letters are listed at once (the oldest), so that a huge dead-letter queue does not
/// fill the lister's memory.
pub const MAX_LISTED_DEAD_LETTERS: usize = 1_000;

fn to_dead_letter(delivery: &Delivery, group: &GroupName, max_payload: usize) -> DeadLetter {
    let props = &delivery.properties;
    let failure = wire::header_str(props, wire::H_DEAD_LETTER_CAUSE)
        .or_else(|| wire::header_str(props, wire::H_DEAD_LETTER_CAUSE_OLD));
    DeadLetter {
        envelope: wire::envelope(props, &delivery.data, max_payload).ok(),
        message_id: props.message_id().as_ref().map(|m| m.as_str().to_owned()),
        payload: delivery.data.clone().into(),
        group: group.clone(),
        last_error: wire::header_str(props, wire::H_LAST_ERROR).unwrap_or_default(),
        cause: DeadLetterCause::parse(failure.as_deref().unwrap_or_default()),
        attempts: wire::attempt(props),
        failed_at: wire::header_str(props, wire::H_FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc)),
    }
}

/// The next message of `queue`, unacknowledged (returned to the queue when the channel closes unless acked).
async fn next(channel: &Channel, queue: &str) -> Result<Option<Delivery>, BusError> {
    let message = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.map_err(transport)?;
    Ok(message.map(|m| m.delivery))
}

async fn scan(channel: &Channel, queue: &str) -> Result<Vec<Delivery>, BusError> {
    let mut out = Vec::new();
    while out.len() < MAX_LISTED_DEAD_LETTERS {
        match next(channel, queue).await? {
            Some(delivery) => out.push(delivery),
            None => break,
        }
    }
    Ok(out)
}

pub(crate) async fn list(
    session: &Session,
    group: &GroupName,
    max_payload: usize,
) -> Result<Vec<DeadLetter>, BusError> {
    let channel = session.connection.create_channel().await.map_err(transport)?;
    let messages = scan(&channel, &topology::dead_letter_queue(group)).await;
    // Closing without acknowledging returns every message to the queue.
    let _ = channel.close(200, "OK".into()).await;
    Ok(messages?.iter().map(|d| to_dead_letter(d, group, max_payload)).collect())
}

pub(crate) async fn redrive(session: &Session, group: &GroupName, id: Option<Uuid>) -> Result<usize, BusError> {
    let channel = session.connection.create_channel().await.map_err(transport)?;
    channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(transport)?;
    let publisher = ConfirmedChannel::new(channel.clone());
    let (exchange, routing_key) = if topology::is_partitioned(&session.connection, group).await? {
        (topology::partition_exchange(group), String::new())
    } else {
        (String::new(), group.as_str().to_owned())
    };
    let queue = topology::dead_letter_queue(group);
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let held = channel
        .queue_declare(queue.as_str().into(), passive, lapin::types::FieldTable::default())
        .await
        .map_err(transport)?
        .message_count();
    let mut redriven = 0;
    // At most the messages held at the start: a redriven message that fails again comes back behind them.
    for _ in 0..held {
        let Some(delivery) = next(&channel, &queue).await? else { break };
        let message_id = delivery.properties.message_id().as_ref().and_then(|m| Uuid::parse_str(m.as_str()).ok());
        if id.is_some() && message_id != id {
            continue; // left unacknowledged: back to the queue when the channel closes
        }
        let properties = wire::with_headers(&delivery.properties, &[(wire::H_ATTEMPT, AMQPValue::LongLongInt(1))]);
        if !confirmed_publish_to(&publisher, &exchange, &routing_key, &delivery.data, properties).await {
            let _ = channel.close(200, "OK".into()).await;
            return Err(BusError::Transport(format!("redrive to {group} was not confirmed by the broker").into()));
        }
        delivery.ack(BasicAckOptions::default()).await.map_err(transport)?;
        redriven += 1;
    }
    let _ = channel.close(200, "OK".into()).await;
    Ok(redriven)
}
