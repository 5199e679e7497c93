//! Exchanges and bindings: their durable definitions and the routing they compile into.
//!
//! An exchange routes each message to the queues (and, through exchange-to-exchange bindings,
//! the exchanges) whose bindings match it: `direct` by equal routing key, `fanout` always,
//! `topic` by pattern ([`topic`]), `headers` by header values ([`headers`]). An exchange that
//! routes a message nowhere hands it to its alternate exchange, if it has one. The nameless
//! default exchange routes to the queue named by the routing key and takes no bindings.
//!
//! Definitions change only through the controller; routing reads an immutable
//! [`routing::RoutingTable`] rebuilt after each change, so publishers never take a lock.

pub mod headers;
pub mod routing;
pub mod topic;

use serde::{Deserialize, Serialize};

use crate::message::value::{FieldTable, FieldValue, lookup};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// An exchange's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    /// Deleted when its last binding (as a source) is removed.
    pub auto_delete: bool,
    /// Only other exchanges may publish to it.
    pub internal: bool,
    pub arguments: FieldTable,
}

impl ExchangeRecord {
    pub fn alternate_exchange(&self) -> Option<&str> {
        lookup(&self.arguments, "alternate-exchange").and_then(FieldValue::as_str)
    }
}

/// What a binding leads to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Self::Queue(name) | Self::Exchange(name) => name,
        }
    }
}

/// A binding's definition. Two bindings are the same if every field is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingRecord {
    pub vhost: String,
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl BindingRecord {
    /// A key that identifies the binding within its virtual host.
    pub fn key(&self) -> String {
        let (kind, name) = match &self.destination {
            Destination::Queue(name) => ("q", name),
            Destination::Exchange(name) => ("e", name),
        };
        let arguments = serde_json::to_string(&self.arguments).unwrap_or_default();
        format!(
            "{}\u{0}{kind}\u{0}{name}\u{0}{}\u{0}{arguments}",
            self.source, self.routing_key
        )
    }
}

/// The exchanges every virtual host starts with.
pub fn default_exchanges(vhost: &str) -> Vec<ExchangeRecord> {
    [
        ("", ExchangeKind::Direct),
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ]
    .into_iter()
    .map(|(name, kind)| ExchangeRecord {
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        kind,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::new(),
    })
    .collect()
}
