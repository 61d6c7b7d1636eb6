//! Listing and redriving `<group>.dlq`.
//!
//! Listing takes the messages without acknowledging them and closes the channel, which returns them all to the
//! queue. Redriving publishes a message back to `<group>` (attempts from 1, broker-confirmed) before removing it
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

/// At most this many messages are looked at per call.
const MAX_SCAN: usize = 100_000;

fn to_dead_letter(delivery: &Delivery, group: &GroupName, max_payload: usize) -> DeadLetter {
    let props = &delivery.properties;
    let failure = wire::header_str(props, wire::H_FIRST_FAILURE);
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

async fn scan(channel: &Channel, queue: &str) -> Result<Vec<Delivery>, BusError> {
    let mut out = Vec::new();
    while out.len() < MAX_SCAN {
        match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.map_err(transport)? {
            Some(message) => out.push(message.delivery),
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
    let messages = scan(&channel, &topology::dead_letter_queue(group)).await?;
    let mut redriven = 0;
    for delivery in messages {
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
