//! The wire format of CONTRACT §1: an [`Envelope`] as AMQP properties, headers and a JSON body, and back.
//!
//! Decoding is strict about what identifies an event (message id, type, size) and lenient about the rest, so that
//! a foreign service that sends only the required properties is understood. A message that cannot be understood
//! is a [`Poison`]: it goes to the dead-letter queue with the reason, never back to the handler.

use bus_core::{BusError, Envelope, EventTypeName, TraceContext};
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use uuid::Uuid;

pub(crate) const H_VERSION: &str = "x-event-version";
pub(crate) const H_OCCURRED_AT: &str = "x-occurred-at";
pub(crate) const H_CAUSATION: &str = "x-causation-id";
pub(crate) const H_PARTITION_KEY: &str = "x-partition-key";
/// The partition key's bucket, for partitioned groups. Not `x-` prefixed: RabbitMQ's headers exchange ignores
/// such headers when it matches.
pub(crate) const H_PARTITION_BUCKET: &str = "partition-bucket";
pub(crate) const H_TRACEPARENT: &str = "traceparent";
pub(crate) const H_TRACESTATE: &str = "tracestate";
pub(crate) const H_OUTBOX_SEQ: &str = "x-outbox-seq";
pub(crate) const H_ATTEMPT: &str = "x-attempt";
pub(crate) const H_LAST_ERROR: &str = "x-last-error";
pub(crate) const H_FAILED_AT: &str = "x-failed-at";
/// Why a dead letter was given up on ([`bus_core::DeadLetterCause::as_str`]).
pub(crate) const H_DEAD_LETTER_CAUSE: &str = "x-dead-letter-cause";
/// The name this header had before (it held the same thing): read, never written.
pub(crate) const H_DEAD_LETTER_CAUSE_OLD: &str = "x-first-failure";

/// Why a message can never be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Poison(pub String);

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The headers and properties of `envelope` (attempt headers are added by the consumer on retries).
pub(crate) fn properties(envelope: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(H_VERSION.into(), AMQPValue::LongLongInt(i64::from(envelope.version())));
    headers.insert(H_OCCURRED_AT.into(), long(&envelope.occurred_at().to_rfc3339_opts(SecondsFormat::Millis, true)));
    if let Some(causation) = envelope.causation_id() {
        headers.insert(H_CAUSATION.into(), long(&causation.to_string()));
    }
    if let Some(key) = envelope.partition_key() {
        headers.insert(H_PARTITION_KEY.into(), long(key));
        headers.insert(H_PARTITION_BUCKET.into(), long(&partition_bucket(key).to_string()));
    }
    if let Some(tp) = envelope.trace().traceparent() {
        headers.insert(H_TRACEPARENT.into(), long(tp));
    }
    if let Some(ts) = envelope.trace().tracestate() {
        headers.insert(H_TRACESTATE.into(), long(ts));
    }
    if let Some(seq) = envelope.sequence() {
        headers.insert(H_OUTBOX_SEQ.into(), AMQPValue::LongLongInt(seq));
    }
    // Every string below is bounded by the envelope's limits (≤ 200 bytes), within a short string's 255.
    let mut properties = BasicProperties::default()
        .with_message_id(envelope.id().to_string().into())
        .with_type(envelope.event_type().as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(envelope.occurred_at().timestamp()).unwrap_or(0))
        .with_correlation_id(envelope.correlation_id().into())
        .with_headers(headers);
    if let Some(source) = envelope.source() {
        properties = properties.with_app_id(source.into());
    }
    properties
}

/// Buckets a partition key falls into: partitioned groups map buckets to partitions (`bucket mod partitions`).
pub const PARTITION_BUCKETS: u16 = 64;

const _: () = assert!(bus_core::MAX_PARTITIONS <= PARTITION_BUCKETS);

/// The bucket of partition key `key`: CRC-32 (the zlib/PNG/Ethernet one, as `zlib.crc32` in Python or
/// `java.util.zip.CRC32`) of its UTF-8 bytes, modulo [`PARTITION_BUCKETS`]. Sent as the `partition-bucket`
/// header (a decimal string) with every keyed event; fixed forever, so that a key never changes partition.
pub fn partition_bucket(key: &str) -> u16 {
    const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    // The remainder is below 64: the cast cannot truncate.
    (CRC32.checksum(key.as_bytes()) % u32::from(PARTITION_BUCKETS)) as u16
}

/// Adds or replaces headers in `properties`.
/// Headers the broker sets on a delivery, which a republished copy (retry, dead letter, redrive) must not carry:
/// the new message has been delivered zero times and died nowhere yet.
const BROKER_HEADERS: [&str; 6] = [
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-reason",
];

/// The properties of a delivery for a republished copy: the broker's own headers dropped, `extra` set.
pub(crate) fn with_headers(properties: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            if !BROKER_HEADERS.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, value) in extra {
        headers.insert(ShortString::from(*name), value.clone());
    }
    properties.clone().with_headers(headers)
}

pub(crate) fn text_header(value: &str) -> AMQPValue {
    // Keep reasons short: they are for people, and headers travel with every retry.
    let value: String = value.chars().take(500).collect();
    long(&value)
}

pub(crate) fn now_header() -> AMQPValue {
    long(&Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref().and_then(|h| h.inner().get(name))
}

pub(crate) fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => String::from_utf8(b.as_slice().to_vec()).ok(),
        _ => None,
    }
}

pub(crate) fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    Some(match header(properties, name)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok()?,
        _ => return None,
    })
}

/// How often the broker delivered this message before (`x-delivery-count`, set by quorum queues; classic queues
/// do not count, 0 there).
pub(crate) fn earlier_deliveries(properties: &BasicProperties) -> u32 {
    header_int(properties, "x-delivery-count").and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// The attempt number carried by a delivery (1 for a first delivery).
pub(crate) fn attempt(properties: &BasicProperties) -> u32 {
    header_int(properties, H_ATTEMPT).and_then(|a| u32::try_from(a).ok()).filter(|a| *a >= 1).unwrap_or(1)
}

/// Rebuilds the envelope of a delivery, or says why it never can be handled.
pub(crate) fn envelope(properties: &BasicProperties, body: &[u8], max_payload: usize) -> Result<Envelope, Poison> {
    let id = properties.message_id().as_ref().ok_or_else(|| Poison("missing message_id".into()))?;
    let id = Uuid::parse_str(id.as_str())
        .map_err(|_| Poison(format!("message_id {:?} is not a UUID", truncate(id.as_str()))))?;
    let kind = properties.kind().as_ref().ok_or_else(|| Poison("missing type property".into()))?;
    let event_type = EventTypeName::new(kind.as_str()).map_err(|e| Poison(e.to_string()))?;
    if body.len() > max_payload {
        return Err(Poison(format!("payload of {} bytes is over the limit of {max_payload} bytes", body.len())));
    }
    let version = header_int(properties, H_VERSION).unwrap_or(1);
    let version = u32::try_from(version).map_err(|_| Poison(format!("invalid {H_VERSION} {version}")))?;
    let occurred_at = header_str(properties, H_OCCURRED_AT)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            properties.timestamp().and_then(|t| i64::try_from(t).ok()).and_then(|t| DateTime::from_timestamp(t, 0))
        })
        .unwrap_or_else(Utc::now);
    let causation = header_str(properties, H_CAUSATION).and_then(|c| Uuid::parse_str(&c).ok());
    // Lenient with what a foreign publisher may get wrong in metadata (CONTRACT: only what can never succeed is
    // dead-lettered): a trace header, correlation id or app id that breaks the limits is dropped, not fatal.
    let valid_trace = |header: &str| {
        header_str(properties, header).filter(|value| TraceContext::new(Some(value.clone()), None).is_ok())
    };
    let trace = TraceContext::new(valid_trace(H_TRACEPARENT), valid_trace(H_TRACESTATE)).unwrap_or_default();
    let mut correlation = properties.correlation_id().as_ref().map(|c| c.as_str());
    let mut source = properties.app_id().as_ref().map(|a| a.as_str());
    loop {
        let mut builder = Envelope::builder(event_type.clone(), body.to_vec())
            .id(id)
            .version(version)
            .occurred_at(occurred_at)
            .causation_id(causation)
            .partition_key(header_str(properties, H_PARTITION_KEY))
            .sequence(header_int(properties, H_OUTBOX_SEQ))
            .trace(trace.clone())
            .max_payload_bytes(max_payload);
        if let Some(correlation) = correlation {
            builder = builder.correlation_id(correlation);
        }
        if let Some(source) = source {
            builder = builder.source(source);
        }
        match builder.build() {
            Err(BusError::InvalidEnvelope { field: "correlation_id", reason }) if correlation.is_some() => {
                tracing::debug!(event_id = %id, %reason, "correlation_id dropped (the event id stands in)");
                correlation = None;
            }
            Err(BusError::InvalidEnvelope { field: "source", reason }) if source.is_some() => {
                tracing::debug!(event_id = %id, %reason, "app_id dropped");
                source = None;
            }
            built => return built.map_err(|e| Poison(e.to_string())),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republished_copy_drops_the_brokers_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(20));
        headers.insert("x-death".into(), AMQPValue::LongLongInt(1));
        headers.insert(H_VERSION.into(), AMQPValue::LongLongInt(3));
        let props = BasicProperties::default().with_headers(headers);
        let copy = with_headers(&props, &[(H_ATTEMPT, AMQPValue::LongLongInt(1))]);
        assert_eq!(earlier_deliveries(&copy), 0);
        assert!(header(&copy, "x-death").is_none());
        assert_eq!((header_int(&copy, H_VERSION), attempt(&copy)), (Some(3), 1));
    }

    #[test]
    fn bad_metadata_of_a_foreign_publisher_is_dropped_not_fatal() {
        let id = Uuid::now_v7();
        let mut headers = FieldTable::default();
        headers.insert(H_TRACEPARENT.into(), long("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        headers.insert(H_TRACESTATE.into(), long(&"a".repeat(600)));
        let props = BasicProperties::default()
            .with_message_id(id.to_string().into())
            .with_type("OrderPaid".into())
            .with_app_id("".into())
            .with_correlation_id("".into())
            .with_headers(headers);
        let envelope = envelope(&props, b"{}", 1024).expect("handled, not dead-lettered");
        assert_eq!(envelope.correlation_id(), id.to_string(), "the event id stands in");
        assert_eq!(envelope.source(), None);
        assert_eq!(envelope.trace().tracestate(), None, "the oversized tracestate is dropped");
        assert!(envelope.trace().traceparent().is_some(), "the valid traceparent is kept");
        let no_id = BasicProperties::default().with_type("OrderPaid".into());
        assert!(envelope_of(&no_id).is_err(), "what can never succeed still is poison");
    }

    fn envelope_of(props: &BasicProperties) -> Result<Envelope, Poison> {
        envelope(props, b"{}", 1024)
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let original = Envelope::builder(EventTypeName::new("OrderPaid").unwrap(), &b"{\"a\":1}"[..])
            .version(3)
            .correlation_id("req-1")
            .causation_id(Some(Uuid::now_v7()))
            .partition_key(Some("order-9".into()))
            .source("ordering")
            .sequence(Some(42))
            .trace(
                TraceContext::new(
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                    Some("v=1".into()),
                )
                .unwrap(),
            )
            .build()
            .unwrap();
        let props = properties(&original);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        let back = envelope(&props, original.payload(), 1024).unwrap();
        assert_eq!(back, original);
        assert_eq!(attempt(&props), 1);
    }

    #[test]
    fn partition_buckets_are_crc32_mod_64_as_other_languages_compute_them() {
        // Python: zlib.crc32(key.encode()) % 64
        for (key, bucket) in [("key-1", 58), ("order-9", 29), ("o-17", 7), ("", 0), ("ünïcode", 42)] {
            assert_eq!(partition_bucket(key), bucket, "{key}");
        }
        let keyed = Envelope::builder(EventTypeName::new("T").unwrap(), &b"{}"[..])
            .partition_key(Some("order-9".into()))
            .build()
            .unwrap();
        assert_eq!(header_str(&properties(&keyed), H_PARTITION_BUCKET).as_deref(), Some("29"));
    }

    #[test]
    fn what_cannot_be_handled_is_poison_with_a_reason() {
        let good = Envelope::builder(EventTypeName::new("T").unwrap(), &b"{}"[..]).build().unwrap();
        let props = properties(&good);
        let cases = [
            (BasicProperties::default(), "missing message_id"),
            (props.clone().with_message_id("nope".into()), "not a UUID"),
            (BasicProperties::default().with_message_id(good.id().to_string().into()), "missing type"),
            (props.clone().with_type("bad type!".into()), "invalid event type name"),
        ];
        for (props, reason) in cases {
            let err = envelope(&props, b"{}", 1024).unwrap_err();
            assert!(err.0.contains(reason), "{err:?} should say {reason}");
        }
        let err = envelope(&props, &[b' '; 2000], 1024).unwrap_err();
        assert!(err.0.contains("over the limit"), "{err:?}");
    }
}
