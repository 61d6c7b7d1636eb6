//! Validated names: event type names and consumer group (service) names.
//!
//! Both follow the CONTRACT pattern `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`. They reach AMQP routing keys, queue names
//! and SQL parameters, so nothing else is ever accepted: a name is checked once, when it is created, and the
//! types below cannot hold an invalid one.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::BusError;

/// Longest accepted name, in bytes (the pattern allows 1 + 199 characters, all ASCII).
pub const MAX_NAME_LEN: usize = 200;

/// Checks `name` against `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`; `Err` holds a human-readable reason.
fn check_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("it is empty"),
        Some(first) if !first.is_ascii_alphabetic() => return Err("it must start with an ASCII letter"),
        Some(_) => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 200 characters");
    }
    if chars.any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err("only ASCII letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates `name` against `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`.
            ///
            /// # Errors
            /// [`BusError::InvalidName`] naming the offending value and the rule it breaks.
            pub fn new(name: impl AsRef<str>) -> Result<Self, BusError> {
                let name = name.as_ref();
                check_name(name).map_err(|reason| BusError::InvalidName {
                    what: $what,
                    name: name.chars().take(MAX_NAME_LEN + 1).collect(),
                    reason,
                })?;
                Ok(Self(Arc::from(name)))
            }

            /// A name written in the program (a literal), e.g. `from_static("ordering")`; use
            /// [`new`](Self::new) for names that come from configuration or input.
            ///
            /// # Panics
            /// If `name` breaks the rule: a literal that does is a bug, and the first run shows it.
            #[track_caller]
            pub fn from_static(name: &'static str) -> Self {
                match Self::new(name) {
                    Ok(name) => name,
                    Err(error) => panic!("{error}"),
                }
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = BusError;
            fn try_from(value: String) -> Result<Self, BusError> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = BusError;
            fn try_from(value: &str) -> Result<Self, BusError> {
                Self::new(value)
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0.to_string()
            }
        }
    };
}

validated_name!(
    /// The name of an event type, e.g. `OrderStockConfirmed`: the AMQP routing key and `type` property.
    ///
    /// Guaranteed to match `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`. Cheap to clone.
    EventTypeName,
    "event type name"
);

validated_name!(
    /// The name of a consumer group: the consuming service, e.g. `catalog`. On RabbitMQ it is the queue name.
    ///
    /// Guaranteed to match `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`. Cheap to clone.
    GroupName,
    "consumer group name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_contract_names() {
        for name in ["OrderStockConfirmed", "a", "Order.v2-created_x", &"A".repeat(200)] {
            assert!(EventTypeName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for name in ["", "1abc", "_x", "with space", "semi;colon", "é", "a*", &"A".repeat(201), "a\0b"] {
            let err = EventTypeName::new(name).unwrap_err();
            assert!(matches!(err, BusError::InvalidName { .. }), "{name}: {err}");
            assert!(err.to_string().contains("event type name"), "{err}");
        }
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<GroupName>("\"catalog\"").is_ok());
        assert!(serde_json::from_str::<GroupName>("\"bad name\"").is_err());
    }
}
