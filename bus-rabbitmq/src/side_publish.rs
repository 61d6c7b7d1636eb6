//! Publishes of the consumer's own (retries, dead letters, redrives) on a confirm-mode channel, each awaited
//! until the broker confirmed it and bounded in time.

use lapin::options::BasicPublishOptions;

use crate::confirms::{ConfirmedChannel, Outcome};

/// Publishes to a queue through the default exchange and waits for the broker's confirm.
pub(crate) async fn confirmed_publish(
    channel: &ConfirmedChannel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> bool {
    confirmed_publish_to(channel, "", queue, body, properties).await
}

/// Publishes `mandatory` to `exchange` with `routing_key` and waits for the broker's confirm: `true` only if a
/// queue took the message.
pub(crate) async fn confirmed_publish_to(
    channel: &ConfirmedChannel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> bool {
    let queue = routing_key;
    let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
    let published = async {
        match channel.publish(exchange, routing_key, options, bytes::Bytes::copy_from_slice(body), properties).await {
            Ok(answered) => match answered.await {
                Ok(Outcome::Confirmed) => true,
                Ok(other) => {
                    tracing::warn!(queue, outcome = ?other, "broker did not take the message");
                    false
                }
                Err(_) => {
                    tracing::warn!(queue, "the channel's confirm path ended");
                    false
                }
            },
            Err(error) => {
                tracing::warn!(queue, %error, "publish failed");
                false
            }
        }
    };
    // A dead connection may leave the confirm unanswered forever: bound it.
    tokio::time::timeout(SIDE_PUBLISH_TIMEOUT, published).await.unwrap_or_else(|_| {
        tracing::warn!(queue, "no confirm within {SIDE_PUBLISH_TIMEOUT:?}");
        false
    })
}

/// How long a retry or dead-letter publish may wait for its confirm.
const SIDE_PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
