//! Dead-lettering: republishing a message a queue gave up on to the queue's dead-letter
//! exchange, with the history RabbitMQ writes into its headers.
//!
//! Headers of a dead-lettered message, as RabbitMQ writes them:
//! - `x-death`: an array of tables, most recent death first, one per (queue, reason) pair:
//!   `count` (long), `reason` (longstr), `queue` (longstr), `time` (timestamp of the first
//!   such death, seconds), `exchange` (longstr), `routing-keys` (array of longstr: the routing
//!   key and any `CC` keys), and `original-expiration` (longstr) if the message had a
//!   per-message TTL. A repeated death in the same queue for the same reason increments
//!   `count` and moves the entry to the front.
//! - `x-first-death-queue`, `-reason`, `-exchange`: set by the first death only.
//! - `x-last-death-queue`, `-reason`, `-exchange`: set by every death.
//!
//! The per-message `expiration` is removed, so a dead letter does not expire again on its way.
//!
//! Queue owners never wait for other queues: they hand dead letters to one forwarder task
//! through a bounded channel, and the forwarder routes and publishes them. Dead-lettering is
//! at most once, as in RabbitMQ: if the forwarder is saturated, the message is dropped with a
//! warning. A message that would cycle back to a queue it already died in, with no rejection
//! along the cycle, is dropped for that queue (RabbitMQ's cycle rule).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::exchange::routing::RoutingTable;
use crate::message::value::{self, FieldTable, FieldValue, lookup};
use crate::message::{Message, Properties};
use crate::queue::{DeathReason, Queue};

/// Dead letters waiting for the forwarder, across the broker.
pub const FORWARDER_CAPACITY: usize = 16_384;

/// A message on its way to a dead-letter exchange.
#[derive(Debug)]
pub struct DeadLetter {
    pub vhost: Arc<str>,
    /// The message as it will be republished (history recorded, exchange and routing key set).
    pub message: Arc<Message>,
}

/// Adds one death to a message's history and readdresses it to the dead-letter exchange.
pub fn record_death(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    dead_letter_exchange: &str,
    dead_letter_routing_key: Option<&str>,
    now_ms: i64,
) -> Message {
    let mut properties: Properties = (*message.properties).clone();
    let original_expiration = properties.expiration.take();
    let mut headers = properties.headers.take().unwrap_or_default();
    let mut deaths: Vec<FieldValue> = match lookup(&headers, "x-death") {
        Some(FieldValue::Array(entries)) => entries.clone(),
        _ => Vec::new(),
    };
    let same = deaths.iter().position(|entry| match entry {
        FieldValue::Table(table) => {
            lookup(table, "queue").and_then(FieldValue::as_str) == Some(queue)
                && lookup(table, "reason").and_then(FieldValue::as_str) == Some(reason.name())
        }
        _ => false,
    });
    let entry = match same {
        Some(index) => {
            let mut entry = deaths.remove(index);
            if let FieldValue::Table(table) = &mut entry {
                let count = lookup(table, "count")
                    .and_then(FieldValue::as_i64)
                    .unwrap_or(0);
                value::set(table, "count", FieldValue::I64(count + 1));
            }
            entry
        }
        None => {
            let routing_keys = message
                .death_routing_keys()
                .into_iter()
                .map(FieldValue::string)
                .collect();
            let mut table: FieldTable = Vec::with_capacity(7);
            if let Some(expiration) = &original_expiration {
                table.push(("original-expiration".into(), FieldValue::string(expiration)));
            }
            table.extend([
                ("count".to_owned(), FieldValue::I64(1)),
                ("reason".to_owned(), FieldValue::string(reason.name())),
                ("queue".to_owned(), FieldValue::string(queue)),
                (
                    "time".to_owned(),
                    FieldValue::Timestamp((now_ms / 1000).max(0) as u64),
                ),
                (
                    "exchange".to_owned(),
                    FieldValue::string(&*message.exchange),
                ),
                ("routing-keys".to_owned(), FieldValue::Array(routing_keys)),
            ]);
            FieldValue::Table(table)
        }
    };
    deaths.insert(0, entry);
    value::set(&mut headers, "x-death", FieldValue::Array(deaths));
    if lookup(&headers, "x-first-death-reason").is_none() {
        value::set(
            &mut headers,
            "x-first-death-exchange",
            FieldValue::string(&*message.exchange),
        );
        value::set(
            &mut headers,
            "x-first-death-queue",
            FieldValue::string(queue),
        );
        value::set(
            &mut headers,
            "x-first-death-reason",
            FieldValue::string(reason.name()),
        );
    }
    value::set(
        &mut headers,
        "x-last-death-exchange",
        FieldValue::string(&*message.exchange),
    );
    value::set(
        &mut headers,
        "x-last-death-queue",
        FieldValue::string(queue),
    );
    value::set(
        &mut headers,
        "x-last-death-reason",
        FieldValue::string(reason.name()),
    );
    properties.headers = Some(headers);
    Message {
        exchange: Arc::from(dead_letter_exchange),
        routing_key: dead_letter_routing_key
            .map_or_else(|| Arc::clone(&message.routing_key), Arc::from),
        properties: properties.into(),
        body: message.body.clone(),
    }
}

/// Whether delivering `message` to `queue` would close a dead-letter cycle that no consumer
/// broke by rejecting (RabbitMQ drops such messages rather than loop forever).
pub fn is_cycle(message: &Message, queue: &str) -> bool {
    let Some(FieldValue::Array(deaths)) = message.properties.header("x-death") else {
        return false;
    };
    let mut in_cycle = false;
    for death in deaths {
        let FieldValue::Table(table) = death else {
            continue;
        };
        let reason = lookup(table, "reason").and_then(FieldValue::as_str);
        if reason == Some("rejected") {
            return false;
        }
        if lookup(table, "queue").and_then(FieldValue::as_str) == Some(queue) {
            in_cycle = true;
            break;
        }
    }
    in_cycle
}

/// Looks up a virtual host's routing table.
pub type RoutingLookup = Arc<dyn Fn(&str) -> Option<Arc<RoutingTable>> + Send + Sync>;

/// The forwarder task: routes dead letters and publishes them to their queues.
pub async fn forward(
    mut receiver: mpsc::Receiver<DeadLetter>,
    routing: RoutingLookup,
) -> Result<(), String> {
    let mut batch = Vec::with_capacity(256);
    while receiver.recv_many(&mut batch, 256).await > 0 {
        let mut per_queue: HashMap<usize, (Arc<Queue>, Vec<Arc<Message>>)> = HashMap::new();
        for letter in batch.drain(..) {
            let Some(table) = routing(&letter.vhost) else {
                continue;
            };
            let keys = letter.message.routing_keys();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut targets = Vec::new();
            let routed = table.route(
                &letter.message.exchange,
                &keys,
                letter.message.properties.headers.as_ref(),
                &mut targets,
            );
            if routed.is_err() {
                tracing::debug!(vhost = %letter.vhost, exchange = %letter.message.exchange, "dead-letter exchange does not exist; message dropped");
                continue;
            }
            for queue in targets {
                if is_cycle(&letter.message, queue.name()) {
                    tracing::debug!(queue = queue.name(), "dead-letter cycle; message dropped");
                    continue;
                }
                per_queue
                    .entry(Arc::as_ptr(&queue) as usize)
                    .or_insert_with(|| (Arc::clone(&queue), Vec::new()))
                    .1
                    .push(Arc::clone(&letter.message));
            }
        }
        for (_, (queue, messages)) in per_queue {
            if let Err(error) = queue.publish(messages).await {
                tracing::debug!(queue = queue.name(), %error, "cannot publish dead letters");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message() -> Message {
        Message {
            exchange: "orders".into(),
            routing_key: "new".into(),
            properties: Properties {
                expiration: Some("5000".into()),
                headers: Some(vec![(
                    "CC".into(),
                    FieldValue::Array(vec![FieldValue::string("audit")]),
                )]),
                ..Properties::default()
            }
            .into(),
            body: Bytes::from_static(b"x"),
        }
    }

    fn death(message: &Message, index: usize) -> &FieldTable {
        match message.properties.header("x-death") {
            Some(FieldValue::Array(deaths)) => match &deaths[index] {
                FieldValue::Table(table) => table,
                other => panic!("not a table: {other:?}"),
            },
            other => panic!("no x-death: {other:?}"),
        }
    }

    #[test]
    fn first_death_writes_the_history() {
        let dead = record_death(&message(), "q1", DeathReason::Expired, "dlx", None, 10_500);
        assert_eq!(&*dead.exchange, "dlx");
        assert_eq!(&*dead.routing_key, "new");
        assert_eq!(dead.properties.expiration, None);
        let entry = death(&dead, 0);
        assert_eq!(lookup(entry, "count"), Some(&FieldValue::I64(1)));
        assert_eq!(
            lookup(entry, "reason"),
            Some(&FieldValue::string("expired"))
        );
        assert_eq!(lookup(entry, "queue"), Some(&FieldValue::string("q1")));
        assert_eq!(lookup(entry, "time"), Some(&FieldValue::Timestamp(10)));
        assert_eq!(
            lookup(entry, "exchange"),
            Some(&FieldValue::string("orders"))
        );
        assert_eq!(
            lookup(entry, "routing-keys"),
            Some(&FieldValue::Array(vec![
                FieldValue::string("new"),
                FieldValue::string("audit")
            ]))
        );
        assert_eq!(
            lookup(entry, "original-expiration"),
            Some(&FieldValue::string("5000"))
        );
        assert_eq!(
            dead.properties.header("x-first-death-queue"),
            Some(&FieldValue::string("q1"))
        );
        assert_eq!(
            dead.properties.header("x-last-death-reason"),
            Some(&FieldValue::string("expired"))
        );
    }

    #[test]
    fn repeated_deaths_count_and_reorder() {
        let once = record_death(&message(), "q1", DeathReason::Rejected, "dlx", None, 0);
        let twice = record_death(&once, "q2", DeathReason::Expired, "dlx", Some("k"), 0);
        let thrice = record_death(&twice, "q1", DeathReason::Rejected, "dlx", None, 0);
        assert_eq!(
            lookup(death(&thrice, 0), "queue"),
            Some(&FieldValue::string("q1"))
        );
        assert_eq!(
            lookup(death(&thrice, 0), "count"),
            Some(&FieldValue::I64(2))
        );
        assert_eq!(
            lookup(death(&thrice, 1), "queue"),
            Some(&FieldValue::string("q2"))
        );
        assert_eq!(
            thrice.properties.header("x-first-death-queue"),
            Some(&FieldValue::string("q1"))
        );
        assert_eq!(
            thrice.properties.header("x-last-death-queue"),
            Some(&FieldValue::string("q1"))
        );
        assert_eq!(&*twice.routing_key, "k");
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let expired = record_death(&message(), "q1", DeathReason::Expired, "dlx", None, 0);
        assert!(is_cycle(&expired, "q1"));
        assert!(!is_cycle(&expired, "q2"));
        let rejected = record_death(&message(), "q1", DeathReason::Rejected, "dlx", None, 0);
        assert!(!is_cycle(&rejected, "q1"));
    }
}
