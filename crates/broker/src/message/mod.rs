//! Messages as queues hold them: the exchange and routing key they were published with, their
//! properties, and their body.
//!
//! The model is protocol-neutral: the fourteen properties are the ones AMQP 0-9-1 clients set
//! (and the ones other protocols map onto), headers are a [`FieldTable`]. Front-ends convert
//! their wire types to and from this model; queues store it with [`codec`].
//!
//! Invariants: a [`Message`] never changes once built (it is shared between queues and
//! deliveries through an `Arc`); dead-lettering makes a new one.

pub mod codec;
pub mod value;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::Bytes;

pub use value::{FieldTable, FieldValue};

/// Delivery mode of a message the broker must keep on disk across restarts.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// The properties a publisher may attach to a message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// Per-message time to live in milliseconds, as decimal text.
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    pub kind: Option<String>,
    pub user_id: Option<String>,
    pub app_id: Option<String>,
    pub cluster_id: Option<String>,
}

impl Properties {
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(DELIVERY_MODE_PERSISTENT)
    }

    /// The per-message TTL, if `expiration` holds one.
    pub fn ttl_ms(&self) -> Option<u64> {
        self.expiration.as_deref().and_then(parse_expiration)
    }

    pub fn header(&self, key: &str) -> Option<&FieldValue> {
        self.headers.as_deref().and_then(|h| value::lookup(h, key))
    }
}

/// A message's properties, and the bytes a front-end received them as, for as long as nothing
/// has changed them.
///
/// The encoding is opaque to the broker: the AMQP 0-9-1 front-end keeps a publish's content
/// header payload here and sends it back unchanged with every delivery, instead of encoding
/// the same properties again. Any change through `DerefMut` drops it, so it can never
/// disagree with the properties; messages read back from disk and messages the broker builds
/// have none.
///
/// The value is shared: a publisher that sends the same properties again and again gives its
/// messages one `Properties` between them, and a change copies it first.
#[derive(Debug, Clone, Default)]
pub struct MessageProperties {
    value: Arc<Properties>,
    encoded: Option<Bytes>,
}

impl MessageProperties {
    /// Properties that arrived as `encoded`, which must encode exactly `value`.
    pub fn with_encoding(value: impl Into<Arc<Properties>>, encoded: Bytes) -> Self {
        Self {
            value: value.into(),
            encoded: Some(encoded),
        }
    }

    /// The bytes these properties arrived as, if nothing changed them since.
    pub fn encoded(&self) -> Option<&Bytes> {
        self.encoded.as_ref()
    }
}

impl From<Properties> for MessageProperties {
    fn from(value: Properties) -> Self {
        Self {
            value: Arc::new(value),
            encoded: None,
        }
    }
}

impl From<Arc<Properties>> for MessageProperties {
    fn from(value: Arc<Properties>) -> Self {
        Self {
            value,
            encoded: None,
        }
    }
}

impl Deref for MessageProperties {
    type Target = Properties;

    fn deref(&self) -> &Properties {
        &self.value
    }
}

impl DerefMut for MessageProperties {
    fn deref_mut(&mut self) -> &mut Properties {
        self.encoded = None;
        Arc::make_mut(&mut self.value)
    }
}

/// Two messages' properties are equal when their values are, however they arrived.
impl PartialEq for MessageProperties {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// Parses an `expiration` property: a non-negative integer of milliseconds, as text. RabbitMQ
/// refuses anything else at publish time; see [`validate_expiration`].
pub fn parse_expiration(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Why an `expiration` property is not acceptable, if it is not.
pub fn validate_expiration(text: &str) -> Result<(), String> {
    match text.parse::<i64>() {
        Ok(ms) if ms < 0 => Err(format!("{{value_negative,{ms}}}")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{{invalid_expiration,{text:?}}}")),
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The exchange it was published to ("" for the default exchange).
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    pub properties: MessageProperties,
    pub body: Bytes,
}

impl Message {
    /// Every routing key of the message: its own, then those in its `CC` and `BCC` headers.
    pub fn routing_keys(&self) -> Vec<String> {
        let mut keys = vec![self.routing_key.to_string()];
        for header in ["CC", "BCC"] {
            extend_keys(&mut keys, self.properties.header(header));
        }
        keys
    }

    /// The routing keys RabbitMQ records in `x-death`: its own and those in `CC`, not `BCC`.
    pub fn death_routing_keys(&self) -> Vec<String> {
        let mut keys = vec![self.routing_key.to_string()];
        extend_keys(&mut keys, self.properties.header("CC"));
        keys
    }
}

fn extend_keys(keys: &mut Vec<String>, value: Option<&FieldValue>) {
    if let Some(FieldValue::Array(values)) = value {
        for value in values {
            if let Some(key) = value.as_str() {
                keys.push(key.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_must_be_digits() {
        assert_eq!(parse_expiration("1500"), Some(1500));
        assert_eq!(parse_expiration("-1"), None);
        assert_eq!(parse_expiration("1.5"), None);
        assert_eq!(parse_expiration(""), None);
        assert!(validate_expiration("-5").is_err());
        assert!(validate_expiration("abc").is_err());
        assert!(validate_expiration("0").is_ok());
    }

    #[test]
    fn cc_and_bcc_add_routing_keys() {
        let message = Message {
            exchange: "x".into(),
            routing_key: "a".into(),
            properties: Properties {
                headers: Some(vec![
                    (
                        "CC".into(),
                        FieldValue::Array(vec![FieldValue::string("b")]),
                    ),
                    (
                        "BCC".into(),
                        FieldValue::Array(vec![FieldValue::string("c")]),
                    ),
                ]),
                ..Properties::default()
            }
            .into(),
            body: Bytes::new(),
        };
        assert_eq!(message.routing_keys(), vec!["a", "b", "c"]);
        assert_eq!(message.death_routing_keys(), vec!["a", "b"]);
    }

    #[test]
    fn any_change_drops_the_received_encoding() {
        let value = Properties {
            priority: Some(3),
            ..Properties::default()
        };
        let mut properties =
            MessageProperties::with_encoding(value.clone(), Bytes::from_static(b"wire"));
        assert_eq!(properties.encoded().map(|b| &b[..]), Some(&b"wire"[..]));
        assert_eq!(properties.priority, Some(3), "reads leave it");
        assert_eq!(properties, MessageProperties::from(value));
        let copy = properties.clone();
        properties.priority = Some(4);
        assert_eq!(properties.encoded(), None);
        assert!(copy.encoded().is_some(), "a copy keeps its own");
        assert_eq!(
            copy.priority,
            Some(3),
            "and its value: the change copied the shared one"
        );
        properties.headers.get_or_insert_with(Vec::new);
        assert_eq!(properties.encoded(), None);
    }
}
