//! The one place broker errors become AMQP exceptions.
//!
//! A soft error (311–313, 403–406) closes the channel that caused it; any other code is a hard
//! error and closes the connection. Reply texts are RabbitMQ's: the code's name, " - ", and the
//! explanation, cut to the 255 bytes a short string can hold. The class and method of the
//! offending command go with the close, as clients print them.

use sluice_broker::{BrokerError, MessagingError, StorageClass};

pub const REPLY_SUCCESS: u16 = 200;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const CONNECTION_FORCED: u16 = 320;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const RESOURCE_ERROR: u16 = 506;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// The name RabbitMQ prefixes to a reply text.
pub fn code_name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "OK",
        CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        NO_ROUTE => "NO_ROUTE",
        313 => "NO_CONSUMERS",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        402 => "INVALID_PATH",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// An AMQP exception to raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub code: u16,
    /// The explanation, without the code's name.
    pub explanation: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl Exception {
    pub fn new(code: u16, explanation: impl Into<String>) -> Self {
        Self {
            code,
            explanation: explanation.into(),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Names the method that caused the exception.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// Names the method that raised it, unless it already names one.
    pub fn located(self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.on(class_id, method_id)
        } else {
            self
        }
    }

    /// Whether the connection, not just the channel, must close.
    pub fn is_hard(&self) -> bool {
        !matches!(self.code, 311..=313 | 403..=406)
    }

    /// The reply text as RabbitMQ writes it: `NOT_FOUND - no queue 'q' in vhost '/'`.
    pub fn reply_text(&self) -> String {
        format!("{} - {}", code_name(self.code), self.explanation)
    }
}

impl std::fmt::Display for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.reply_text())
    }
}

/// The exception for a broker error.
pub fn exception(error: &BrokerError) -> Exception {
    match error {
        BrokerError::Messaging(messaging) => {
            let code = match messaging.as_ref() {
                // RabbitMQ answers 404 when a queue's process cannot serve (it is down); the
                // channel closes, the connection stays.
                MessagingError::NotFound { .. }
                | MessagingError::Unreadable { .. }
                | MessagingError::NodeDown { .. } => NOT_FOUND,
                MessagingError::Inequivalent { .. }
                | MessagingError::InvalidArgument { .. }
                | MessagingError::InUse { .. }
                | MessagingError::NotEmpty { .. }
                | MessagingError::PreconditionFailed(_)
                | MessagingError::LimitReached { .. } => PRECONDITION_FAILED,
                MessagingError::Locked { .. } => RESOURCE_LOCKED,
                MessagingError::ExclusiveConsume { .. } | MessagingError::AccessRefused(_) => {
                    ACCESS_REFUSED
                }
                MessagingError::UnknownExchangeType(_) => COMMAND_INVALID,
                MessagingError::VhostNotFound(_) | MessagingError::UserNotFound(_) => NOT_ALLOWED,
                MessagingError::QueueFailed { .. } => INTERNAL_ERROR,
            };
            if code == INTERNAL_ERROR {
                tracing::warn!(%error, "an AMQP request failed on the broker's side");
            }
            Exception::new(code, error.client_message())
        }
        BrokerError::ShuttingDown => Exception::new(
            CONNECTION_FORCED,
            "broker forced connection closure with reason 'shutdown'",
        ),
        other if other.storage_class() == Some(StorageClass::Retriable) => Exception::new(
            CONNECTION_FORCED,
            "broker forced connection closure with reason 'shutdown'",
        ),
        other => {
            if other.is_internal() {
                tracing::warn!(error = %other, "an AMQP request failed on the broker's side");
            }
            Exception::new(INTERNAL_ERROR, other.client_message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_broker::ResourceKind;

    #[test]
    fn texts_and_codes_match_rabbitmq() {
        let missing: BrokerError = MessagingError::NotFound {
            kind: ResourceKind::Exchange,
            vhost: "/".into(),
            name: "exchange".into(),
        }
        .into();
        let e = exception(&missing);
        assert_eq!(e.code, 404);
        assert!(!e.is_hard());
        assert_eq!(
            e.reply_text(),
            "NOT_FOUND - no exchange 'exchange' in vhost '/'"
        );
        let inequivalent: BrokerError = MessagingError::Inequivalent {
            kind: ResourceKind::Queue,
            vhost: "/".into(),
            name: "q".into(),
            arg: "durable".into(),
            received: "'true'".into(),
            current: "'false'".into(),
        }
        .into();
        assert_eq!(
            exception(&inequivalent).reply_text(),
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'"
        );
        let locked: BrokerError = MessagingError::Locked {
            vhost: "/".into(),
            name: "q".into(),
        }
        .into();
        assert_eq!(exception(&locked).code, 405);
        let vhost: BrokerError = MessagingError::VhostNotFound("v".into()).into();
        assert!(exception(&vhost).is_hard());
    }

    #[test]
    fn the_brokers_own_failures_reach_clients_without_paths_or_os_errors() {
        let secret = "/srv/sluice-data/queues/0b5f";
        let failed: BrokerError = MessagingError::QueueFailed {
            vhost: "/".into(),
            name: "orders".into(),
            reason: format!("cannot write {secret}/00000000000000000000.log: os error 28"),
        }
        .into();
        let storage = BrokerError::Storage(sluice_storage::StorageError::Io {
            op: "read",
            path: std::path::PathBuf::from(secret).join("acks"),
            source: std::io::Error::other("Input/output error (os error 5)"),
        });
        for error in [&failed, &storage] {
            let e = exception(error);
            assert_eq!(e.code, INTERNAL_ERROR);
            assert!(!e.reply_text().contains(secret), "{}", e.reply_text());
            assert!(!e.reply_text().contains("os error"), "{}", e.reply_text());
        }
        assert_eq!(
            exception(&failed).reply_text(),
            "INTERNAL_ERROR - queue 'orders' in vhost '/' failed; the broker's log has the details"
        );
    }
}
