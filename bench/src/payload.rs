//! The benchmark message: a 1 KiB JSON payload, as DESIGN.md fixes.

use bus_core::{Envelope, EventTypeName, IntegrationEvent};
use serde::{Deserialize, Serialize};

/// The event type name used by every scenario.
pub const EVENT_TYPE: &str = "BenchEvent";

/// The benchmark event, as a typed handler decodes it.
#[derive(Serialize, Deserialize)]
pub struct BenchEvent {
    pub seq: u64,
    pub data: String,
}

impl IntegrationEvent for BenchEvent {
    const TYPE_NAME: &'static str = EVENT_TYPE;
}

/// A 1 KiB JSON object (`{"seq":N,"data":"xxx…"}` padded to exactly 1024 bytes).
pub fn payload(seq: u64) -> Vec<u8> {
    let head = format!("{{\"seq\":{seq},\"data\":\"");
    let tail = "\"}";
    let pad = 1024 - head.len() - tail.len();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}

/// `count` envelopes of 1 KiB payloads, with partition keys spread over `keys` keys (none if 0).
pub fn envelopes(count: u64, keys: u64) -> anyhow::Result<Vec<Envelope>> {
    let event_type = EventTypeName::new(EVENT_TYPE)?;
    (0..count)
        .map(|seq| {
            let key = (keys > 0).then(|| format!("key-{}", seq % keys));
            Ok(Envelope::builder(event_type.clone(), payload(seq)).partition_key(key).source("bench").build()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn payload_is_one_kib_of_valid_json() {
        for seq in [0, 7, u64::MAX] {
            let p = super::payload(seq);
            assert_eq!(p.len(), 1024);
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["seq"].as_u64(), Some(seq));
        }
    }
}
