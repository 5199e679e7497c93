//! Queue arguments (`x-message-ttl`, `x-max-length`, ...): validation, their effective
//! values, and the equivalence check applied when a queue is declared again.
//!
//! Errors carry the reason in the form RabbitMQ prints it (an Erlang term such as
//! `{value_negative,-1}`), since clients and their users read these messages.

use crate::message::value::{FieldTable, FieldValue, lookup};

/// What a full queue does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the new message (publishers with confirms get a nack).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The arguments that change a queue's behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    pub message_ttl_ms: Option<u64>,
    pub expires_ms: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
    pub delivery_limit: Option<u64>,
    pub single_active_consumer: bool,
}

/// A queue argument that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    pub arg: String,
    pub reason: String,
}

/// The largest TTL or expiry RabbitMQ accepts (its timers' limit).
const MAX_EXPIRY_MS: i64 = 4_294_967_295;

/// Arguments compared when a queue is declared again.
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-single-active-consumer",
    "x-delivery-limit",
];

fn int_arg(value: &FieldValue) -> Result<i64, String> {
    value
        .as_i64()
        .ok_or_else(|| format!("\"expected integer, got {}\"", value.type_name()))
}

fn non_negative(value: &FieldValue) -> Result<u64, String> {
    let n = int_arg(value)?;
    u64::try_from(n).map_err(|_| format!("{{value_negative,{n}}}"))
}

fn expiry(value: &FieldValue) -> Result<u64, String> {
    let n = non_negative(value)?;
    if n as i64 > MAX_EXPIRY_MS {
        return Err(format!("{{value_too_large,{n},{MAX_EXPIRY_MS}}}"));
    }
    Ok(n)
}

fn string_arg(value: &FieldValue) -> Result<String, String> {
    match value {
        FieldValue::LongString(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        other => Err(format!("{{unacceptable_type,{}}}", other.type_name())),
    }
}

/// Validates `arguments` and returns the queue's effective settings.
pub fn parse(arguments: &FieldTable) -> Result<QueueArgs, ArgError> {
    let mut args = QueueArgs::default();
    for (key, value) in arguments {
        let fail = |reason: String| ArgError {
            arg: key.clone(),
            reason,
        };
        match key.as_str() {
            "x-message-ttl" => args.message_ttl_ms = Some(expiry(value).map_err(fail)?),
            "x-expires" => {
                if value.as_i64() == Some(0) {
                    return Err(fail("{value_zero,0}".into()));
                }
                args.expires_ms = Some(expiry(value).map_err(fail)?);
            }
            "x-max-length" => args.max_length = Some(non_negative(value).map_err(fail)?),
            "x-max-length-bytes" => {
                args.max_length_bytes = Some(non_negative(value).map_err(fail)?)
            }
            "x-overflow" => {
                args.overflow = match string_arg(value).map_err(fail)?.as_str() {
                    "drop-head" => Overflow::DropHead,
                    "reject-publish" => Overflow::RejectPublish,
                    "reject-publish-dlx" => Overflow::RejectPublishDlx,
                    _ => return Err(fail("invalid_overflow".into())),
                }
            }
            "x-dead-letter-exchange" => {
                args.dead_letter_exchange = Some(string_arg(value).map_err(fail)?)
            }
            "x-dead-letter-routing-key" => {
                args.dead_letter_routing_key = Some(string_arg(value).map_err(fail)?)
            }
            "x-max-priority" => {
                let n = non_negative(value).map_err(fail)?;
                let priority =
                    u8::try_from(n).map_err(|_| fail(format!("{{max_value_exceeded,{n}}}")))?;
                args.max_priority = Some(priority);
            }
            "x-delivery-limit" => args.delivery_limit = Some(non_negative(value).map_err(fail)?),
            "x-single-active-consumer" => match value {
                FieldValue::Bool(b) => args.single_active_consumer = *b,
                other => {
                    return Err(fail(format!("{{unacceptable_type,{}}}", other.type_name())));
                }
            },
            "x-queue-type" => match string_arg(value).map_err(fail)?.as_str() {
                "classic" | "quorum" => {}
                other => return Err(fail(format!("\"unsupported queue type '{other}'\""))),
            },
            "x-queue-mode" => match string_arg(value).map_err(fail)?.as_str() {
                "default" | "lazy" => {}
                other => return Err(fail(format!("\"unsupported queue mode '{other}'\""))),
            },
            _ => {}
        }
    }
    if args.dead_letter_routing_key.is_some() && args.dead_letter_exchange.is_none() {
        return Err(ArgError {
            arg: "x-dead-letter-routing-key".into(),
            reason: "routing_key_but_no_dlx_defined".into(),
        });
    }
    Ok(args)
}

/// The first argument in which `received` differs from `current`, with both sides described
/// as RabbitMQ does ("the value '5' of type 'long'", or "none").
pub fn first_difference(
    current: &FieldTable,
    received: &FieldTable,
) -> Option<(String, String, String)> {
    for key in EQUIVALENCE_ARGS {
        let a = lookup(current, key);
        let b = lookup(received, key);
        let same = match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_value(b),
            _ => false,
        };
        if !same {
            return Some(((*key).to_owned(), describe(b), describe(a)));
        }
    }
    None
}

fn describe(value: Option<&FieldValue>) -> String {
    match value {
        None => "none".into(),
        Some(value) => format!(
            "the value '{}' of type '{}'",
            value.display(),
            value.type_name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn valid_arguments_are_understood() {
        let args = parse(&table(&[
            ("x-message-ttl", FieldValue::I32(1000)),
            ("x-max-length", FieldValue::I16(5)),
            ("x-overflow", FieldValue::string("reject-publish-dlx")),
            ("x-dead-letter-exchange", FieldValue::string("dlx")),
            ("x-max-priority", FieldValue::U8(10)),
            ("x-single-active-consumer", FieldValue::Bool(true)),
            ("x-unknown", FieldValue::Void),
        ]))
        .unwrap();
        assert_eq!(args.message_ttl_ms, Some(1000));
        assert_eq!(args.max_length, Some(5));
        assert_eq!(args.overflow, Overflow::RejectPublishDlx);
        assert_eq!(args.max_priority, Some(10));
        assert!(args.single_active_consumer);
    }

    #[test]
    fn invalid_arguments_are_refused_with_rabbitmq_reasons() {
        let error = parse(&table(&[("x-message-ttl", FieldValue::I32(-1))])).unwrap_err();
        assert_eq!(error.reason, "{value_negative,-1}");
        let error = parse(&table(&[("x-expires", FieldValue::I32(0))])).unwrap_err();
        assert_eq!(error.reason, "{value_zero,0}");
        let error = parse(&table(&[("x-overflow", FieldValue::string("x"))])).unwrap_err();
        assert_eq!(error.reason, "invalid_overflow");
        let error = parse(&table(&[("x-max-priority", FieldValue::I32(300))])).unwrap_err();
        assert_eq!(error.reason, "{max_value_exceeded,300}");
        let error = parse(&table(&[(
            "x-dead-letter-routing-key",
            FieldValue::string("k"),
        )]))
        .unwrap_err();
        assert_eq!(error.reason, "routing_key_but_no_dlx_defined");
        let error = parse(&table(&[("x-max-length", FieldValue::string("5"))])).unwrap_err();
        assert_eq!(error.reason, "\"expected integer, got longstr\"");
    }

    #[test]
    fn equivalence_ignores_integer_width() {
        let current = table(&[("x-max-length", FieldValue::I64(5))]);
        assert_eq!(
            first_difference(&current, &table(&[("x-max-length", FieldValue::I16(5))])),
            None
        );
        let (arg, received, existing) =
            first_difference(&current, &table(&[("x-max-priority", FieldValue::I16(2))])).unwrap();
        assert_eq!(arg, "x-max-length");
        assert_eq!(received, "none");
        assert_eq!(existing, "the value '5' of type 'long'");
    }
}
