//! What operators need beyond what protocol front-ends use: listings of virtual hosts, queues,
//! exchanges, bindings and users; managing users and permissions; publishing a message and
//! peeking at a queue from the admin API or the CLI.
//!
//! Listings read the committed definitions (the metadata store's current state) and the live
//! queues' counters; they never wait for a queue. Changes go through the controller like
//! every other definition change.

use std::sync::Arc;

use bytes::Bytes;

use crate::Broker;
use crate::controller::{MessagingRequest, Request};
use crate::definitions::VhostDefinitions;
use crate::error::{BrokerError, MessagingError, ResourceKind};
use crate::limits::VhostLimits;
use crate::message::{Message, Properties};
use crate::queue::{Delivery, SettleOp};
use crate::users::{Permission, UserRecord, hash_password, validate_pattern};

/// Messages an operator may peek at in one request.
pub const PEEK_LIMIT: usize = 100;

impl Broker {
    /// Names of every virtual host, sorted.
    pub fn vhost_names(&self) -> Vec<String> {
        let state = self.shared.metadata.state();
        state.messaging.vhosts.keys().cloned().collect()
    }

    /// The committed definitions of a virtual host.
    pub fn vhost_definitions(&self, vhost: &str) -> Option<Arc<VhostDefinitions>> {
        let state = self.shared.metadata.state();
        state.messaging.vhosts.get(vhost).cloned()
    }

    /// Every user, sorted by name.
    pub fn users(&self) -> Vec<UserRecord> {
        let state = self.shared.metadata.state();
        state.messaging.users.values().cloned().collect()
    }

    pub fn user(&self, name: &str) -> Option<UserRecord> {
        let state = self.shared.metadata.state();
        state.messaging.users.get(name).cloned()
    }

    /// Creates or updates a user. Without a password an existing user keeps theirs; a new user
    /// needs one.
    pub async fn put_user(
        &self,
        name: &str,
        password: Option<&str>,
        tags: Vec<String>,
    ) -> Result<(), BrokerError> {
        crate::names::validate_user_name(name).map_err(invalid)?;
        let existing = self.user(name);
        let password_hash = match (password, &existing) {
            (Some(password), _) => hash_password(password),
            (None, Some(user)) => user.password_hash.clone(),
            (None, None) => return Err(invalid(format!("user '{name}' needs a password"))),
        };
        let record = UserRecord {
            name: name.to_owned(),
            password_hash,
            tags,
            limits: existing.as_ref().map(|u| u.limits).unwrap_or_default(),
            permissions: existing.map(|u| u.permissions).unwrap_or_default(),
        };
        self.request(|reply| Request::Messaging(MessagingRequest::PutUser { record, reply }))
            .await
    }

    /// Deletes a user. Open connections of the user stay open, as in RabbitMQ.
    pub async fn delete_user(&self, name: &str) -> Result<(), BrokerError> {
        if self.user(name).is_none() {
            return Err(MessagingError::UserNotFound(name.to_owned()).into());
        }
        let name = name.to_owned();
        self.request(|reply| Request::Messaging(MessagingRequest::DeleteUser { name, reply }))
            .await
    }

    /// Sets (or with `None` clears) a user's permissions in a virtual host.
    pub async fn set_permission(
        &self,
        user: &str,
        vhost: &str,
        permission: Option<Permission>,
    ) -> Result<(), BrokerError> {
        let mut record = self
            .user(user)
            .ok_or_else(|| MessagingError::UserNotFound(user.to_owned()))?;
        if self.vhost(vhost).is_none() {
            return Err(MessagingError::VhostNotFound(vhost.to_owned()).into());
        }
        match permission {
            Some(permission) => {
                for (kind, pattern) in [
                    ("configure", &permission.configure),
                    ("write", &permission.write),
                    ("read", &permission.read),
                ] {
                    validate_pattern(pattern).map_err(|reason| {
                        // The regex crate's message spans lines with a caret under the fault.
                        let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
                        invalid(format!(
                            "the {kind} pattern {pattern:?} is not a valid regular expression: {reason}"
                        ))
                    })?;
                }
                record.permissions.insert(vhost.to_owned(), permission);
            }
            None => {
                record.permissions.remove(vhost);
            }
        }
        self.request(|reply| Request::Messaging(MessagingRequest::PutUser { record, reply }))
            .await
    }

    /// Permissions of every user, by virtual host.
    pub fn permissions(&self) -> Vec<(String, String, Permission)> {
        self.users()
            .into_iter()
            .flat_map(|user| {
                user.permissions
                    .into_iter()
                    .map(move |(vhost, p)| (user.name.clone(), vhost, p))
            })
            .collect()
    }

    /// The limits set on a virtual host.
    pub fn vhost_limits(&self, vhost: &str) -> Option<VhostLimits> {
        self.vhost_definitions(vhost).map(|v| v.limits)
    }

    /// Sets (or with `None` clears) the limit RabbitMQ calls `name` (`max-connections`,
    /// `max-queues`) on a virtual host. Lowering one below what exists closes nothing; it
    /// refuses what would go past it.
    pub async fn set_vhost_limit(
        &self,
        vhost: &str,
        name: &str,
        value: Option<u64>,
    ) -> Result<(), BrokerError> {
        let mut limits = self
            .vhost_limits(vhost)
            .ok_or_else(|| MessagingError::VhostNotFound(vhost.to_owned()))?;
        limits.set(name, value).map_err(invalid)?;
        let vhost = vhost.to_owned();
        self.request(|reply| {
            Request::Messaging(MessagingRequest::SetVhostLimits {
                vhost,
                limits,
                reply,
            })
        })
        .await
    }

    /// Sets (or with `None` clears) the limit RabbitMQ calls `name` (`max-connections`,
    /// `max-channels`) on a user.
    pub async fn set_user_limit(
        &self,
        user: &str,
        name: &str,
        value: Option<u64>,
    ) -> Result<(), BrokerError> {
        let mut record = self
            .user(user)
            .ok_or_else(|| MessagingError::UserNotFound(user.to_owned()))?;
        record.limits.set(name, value).map_err(invalid)?;
        self.request(|reply| Request::Messaging(MessagingRequest::PutUser { record, reply }))
            .await
    }

    /// Creates a virtual host with its default exchanges; not an error if it exists.
    pub async fn create_vhost(&self, name: &str) -> Result<(), BrokerError> {
        crate::names::validate_vhost_name(name).map_err(invalid)?;
        self.ensure_vhost(name).await
    }

    /// Deletes a virtual host and everything in it (exchanges, queues and their messages,
    /// bindings, users' permissions there); connections to it are closed.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), BrokerError> {
        if self.vhost(name).is_none() {
            return Err(MessagingError::VhostNotFound(name.to_owned()).into());
        }
        let name = name.to_owned();
        self.request(|reply| Request::Messaging(MessagingRequest::DeleteVhost { name, reply }))
            .await
    }

    /// Publishes one message to an exchange of a virtual host, as a client would (the
    /// default exchange is `""`). Returns how many queues it reached; persistent messages
    /// are on disk in durable queues when this returns.
    pub async fn publish_message(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        properties: Properties,
        body: Bytes,
    ) -> Result<usize, BrokerError> {
        let live = self
            .vhost(vhost)
            .ok_or_else(|| MessagingError::VhostNotFound(vhost.to_owned()))?;
        let table = live.routing();
        if let Some(record) = table.exchange(exchange)
            && record.internal
        {
            return Err(MessagingError::AccessRefused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
            ))
            .into());
        }
        let message = Arc::new(Message {
            exchange: Arc::from(exchange),
            routing_key: Arc::from(routing_key),
            properties: properties.into(),
            body,
        });
        let keys = message.routing_keys();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut targets = Vec::new();
        table
            .route(
                exchange,
                &keys,
                message.properties.headers.as_ref(),
                &mut targets,
            )
            .map_err(|_| MessagingError::NotFound {
                kind: ResourceKind::Exchange,
                vhost: vhost.to_owned(),
                name: exchange.to_owned(),
            })?;
        let persistent = message.properties.is_persistent();
        let mut reached = 0;
        for queue in targets {
            let outcome = queue.publish(vec![Arc::clone(&message)]).await?;
            if !outcome.rejected.is_empty() {
                continue;
            }
            reached += 1;
            if persistent && queue.is_durable() {
                queue.wait_durable(outcome.end_offset).await?;
            }
        }
        Ok(reached)
    }

    /// Takes up to `count` ready messages from the head of a queue. With `requeue` they are
    /// put back, as RabbitMQ's "get messages, requeue" does: they stay in the queue, marked
    /// redelivered. Without, they leave the queue as if consumed with automatic acknowledgement.
    pub async fn get_from_queue(
        &self,
        vhost: &str,
        name: &str,
        count: usize,
        requeue: bool,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let live = self
            .vhost(vhost)
            .ok_or_else(|| MessagingError::VhostNotFound(vhost.to_owned()))?;
        let queue = live.queue(name).ok_or_else(|| MessagingError::NotFound {
            kind: ResourceKind::Queue,
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        })?;
        let mut taken = Vec::new();
        let mut result = Ok(());
        while taken.len() < count.min(PEEK_LIMIT) {
            match queue.get(!requeue).await {
                Ok(Some(got)) => taken.push(got.delivery),
                Ok(None) => break,
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        if requeue && !taken.is_empty() {
            let offsets = taken.iter().map(|d| d.offset).collect();
            queue.settle(offsets, SettleOp::Requeue).await?;
        }
        // Messages taken out of the queue are returned even if a later `get` failed: they are
        // no longer anywhere else.
        match result {
            Err(error) if taken.is_empty() => Err(error),
            _ => Ok(taken),
        }
    }
}

fn invalid(reason: impl Into<String>) -> BrokerError {
    MessagingError::PreconditionFailed(reason.into()).into()
}
