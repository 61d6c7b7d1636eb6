//! The limits on what an envelope carries, and the one check of its text fields.

use crate::error::BusError;

/// Default payload size limit: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Longest accepted correlation id, partition key or source service name, in bytes.
pub const MAX_METADATA_LEN: usize = 200;

/// Longest accepted `traceparent` / `tracestate`, in bytes (W3C allows 512 for tracestate).
pub const MAX_TRACE_LEN: usize = 512;

/// Checks a text field of an envelope: at most `max` bytes, no control characters, not empty unless allowed.
pub(crate) fn check_text(field: &'static str, value: &str, max: usize, may_be_empty: bool) -> Result<(), BusError> {
    if value.is_empty() && !may_be_empty {
        return Err(BusError::InvalidEnvelope { field, reason: "it is empty".into() });
    }
    if value.len() > max {
        return Err(BusError::InvalidEnvelope {
            field,
            reason: format!("{} bytes, over the limit of {max}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(BusError::InvalidEnvelope { field, reason: "it contains control characters".into() });
    }
    Ok(())
}

/// Checks a payload of `size` bytes of event `event_type` against `limit`.
pub(crate) fn check_payload(event_type: &str, size: usize, limit: usize) -> Result<(), BusError> {
    if size > limit {
        return Err(BusError::PayloadTooLarge { event_type: event_type.to_owned(), size, limit });
    }
    Ok(())
}
