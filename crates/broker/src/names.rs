//! Names: topics follow Kafka's rules, so every client that creates a topic on Kafka can create
//! it here; virtual hosts, users, queues and exchanges follow AMQP's (a short string).

use crate::error::BrokerError;

/// Kafka refuses names longer than this (the directory name gets a partition suffix).
pub const TOPIC_NAME_MAX_BYTES: usize = 249;

/// Checks a topic name: 1..=249 characters from `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let invalid = |reason: &str| {
        Err(BrokerError::InvalidTopic {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return invalid("the name is empty");
    }
    if name == "." || name == ".." {
        return invalid("'.' and '..' are not allowed");
    }
    if name.len() > TOPIC_NAME_MAX_BYTES {
        return invalid("the name is longer than 249 characters");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return invalid(&format!(
            "character {bad:?} is not allowed; use ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks an AMQP name (queue, exchange, virtual host, user): at most 255 bytes, no control
/// characters. `what` names the kind in the error.
pub fn validate_amqp_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("{what} name is longer than 255 bytes"));
    }
    if let Some(bad) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{what} name contains the control character {bad:?}"
        ));
    }
    Ok(())
}

pub fn validate_vhost_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("virtual host name is empty".into());
    }
    validate_amqp_name("virtual host", name)
}

pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("user name is empty".into());
    }
    validate_amqp_name("user", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_rules() {
        for good in ["a", "my-topic", "A.b_c-9", &"x".repeat(249)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
    }
}
