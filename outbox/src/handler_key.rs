//! The inbox's name for one handler, shared by the inbox (which writes it) and the outbox's repair tools (which
//! forget a handler's rows for a replay).

/// `<group>/<event type>`: the inbox keeps one row per event and handler.
pub(crate) fn handler_key(group: &str, event_type: &str) -> String {
    format!("{group}/{event_type}")
}
